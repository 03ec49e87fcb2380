"""The training losses of the two task kinds (torch): cross-entropy (one class per text) or binary
cross-entropy per label (a set of labels per text), with class weights, focal loss and label smoothing
from train.*; at the defaults each is the plain library loss. The tasks (single_label.py, multi_label.py)
pick theirs; callers ask the task (Task.training_loss, Task.soft_loss)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.errors import UserError

UNLABELED = -100  # the label of a text only the teacher labels (distill.unlabeled): no hard-label loss


def named_weights(setting: dict[str, float], names: list[str], noun: str) -> torch.Tensor:
    """train.class_weights given per name: 1 for the names it leaves out."""
    unknown = [k for k in setting if k not in names]
    if unknown:
        raise UserError(f"train.class_weights: no {noun} {unknown[0]!r} in the data (its {noun}s: {', '.join(names)})")
    return torch.tensor([float(setting.get(n, 1.0)) for n in names], dtype=torch.float32)


def balanced_class_weights(labels: np.ndarray, names: list[str]) -> torch.Tensor:
    """sklearn's balanced weights: n_samples / (n_classes * count of the class)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return torch.tensor(len(labels) / (len(names) * np.maximum(counts, 1)), dtype=torch.float32)


def balanced_pos_weights(labels: np.ndarray) -> torch.Tensor:
    """BCE's pos_weight per label: negatives / positives of the label."""
    labels = np.asarray(labels, dtype=np.int64)
    positives = labels.sum(axis=0)
    return torch.tensor((len(labels) - positives) / np.maximum(positives, 1), dtype=torch.float32)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, kind: str,
                    gamma: float, smoothing: float) -> torch.Tensor:
    """Cross-entropy (class-weighted mean, label smoothing) or focal loss (1 - p_true)^gamma * cross-entropy
    with the same weighting; at the defaults it is plain F.cross_entropy, exactly."""
    logits = logits.float()
    if kind == "cross_entropy":
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
    ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing)
    p_true = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1).exp()
    focal = (1 - p_true) ** gamma * ce
    if weight is None:
        return focal.mean()
    w = weight[labels]
    return (focal * w).sum() / w.sum()


def label_set_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None, kind: str,
                   gamma: float, smoothing: float) -> torch.Tensor:
    """Multi-label: binary cross-entropy with logits, mean over texts and labels (targets smoothed to
    s/2 and 1 - s/2; positives weighted by pos_weight), or the sigmoid focal loss (1 - p_t)^gamma * BCE."""
    logits, target = logits.float(), labels.float()
    if smoothing:
        target = target * (1 - smoothing) + smoothing / 2
    if kind == "cross_entropy":
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return ((1 - p_t) ** gamma * bce).mean()


def softmax_soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's part of distillation, scaled by T^2 (Hinton et al.): KL(softmax(teacher / T) ||
    softmax(student / T))."""
    s, t = student.float() / temperature, teacher.float() / temperature
    soft = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return temperature ** 2 * soft


def sigmoid_soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-label distillation, scaled by T^2: BCE of sigmoid(student / T) against sigmoid(teacher / T)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    return temperature ** 2 * F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))


def per_class_rows(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, kind: str,
                   gamma: float, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-label, per row: (weighted loss, row weight) as hard_label_loss weighs them."""
    per = F.cross_entropy(logits, labels, weight=weight if kind == "cross_entropy" else None, reduction="none",
                          label_smoothing=smoothing)
    row_weight = weight[labels] if weight is not None else torch.ones_like(per)
    if kind == "focal":
        p_true = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1).exp()
        per = (1 - p_true) ** gamma * per * row_weight
    return per, row_weight


def per_label_set_rows(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None, kind: str,
                       gamma: float, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label, per row: (loss, mean over the labels; row weight 1) as label_set_loss weighs them."""
    target = labels.float() * (1 - smoothing) + smoothing / 2 if smoothing else labels.float()
    per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    if kind == "focal":
        p = torch.sigmoid(logits)
        per = (1 - (p * target + (1 - p) * (1 - target))) ** gamma * per
    return per.mean(dim=1), torch.ones_like(logits[:, 0])


def masked_hard_loss(task, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, kind: str,
                     gamma: float, smoothing: float) -> torch.Tensor:
    """The task's hard-label loss over the rows that have a label (not UNLABELED), with the same weighting
    as its plain loss; 0 for a batch with none. No host sync: the mask stays on the device."""
    logits = logits.float()
    per, row_weight = task.loss_rows(logits, labels.clamp_min(0), weight, kind, gamma, smoothing)
    mask = task.labelled(labels).float()
    return (per * mask).sum() / (row_weight * mask).sum().clamp_min(1e-12)
