"""The training loss: cross-entropy (single-label) or binary cross-entropy per label (multi-label), with
class weights, focal loss and label smoothing from train.*; at the defaults it is the plain library loss."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.config.schema import TrainConfig
from peftlab.errors import UserError

UNLABELED = -100  # the label of a text only the teacher labels (distill.unlabeled): no hard-label loss


def class_weights(setting: str | dict[str, float], labels: np.ndarray, names: list[str],
                  multi_label: bool = False) -> torch.Tensor | None:
    """train.class_weights as one weight per class (None: unweighted). Single-label: balanced is sklearn's
    n_samples / (n_classes * count of the class). Multi-label: the weights multiply each label's positive
    examples (BCE's pos_weight); balanced is negatives / positives of the label."""
    if setting == "none":
        return None
    labels = np.asarray(labels, dtype=np.int64)
    if setting == "balanced":
        if multi_label:
            positives = labels.sum(axis=0)
            return torch.tensor((len(labels) - positives) / np.maximum(positives, 1), dtype=torch.float32)
        counts = np.bincount(labels, minlength=len(names))
        return torch.tensor(len(labels) / (len(names) * np.maximum(counts, 1)), dtype=torch.float32)
    unknown = [k for k in setting if k not in names]
    if unknown:
        what = "label" if multi_label else "class"
        raise UserError(f"train.class_weights: no {what} {unknown[0]!r} in the data (its {what}s: {', '.join(names)})")
    return torch.tensor([float(setting.get(n, 1.0)) for n in names], dtype=torch.float32)


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


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     multi_label: bool = False) -> torch.Tensor:
    """The teacher's part of distillation, scaled by T^2 (Hinton et al.): KL(softmax(teacher / T) ||
    softmax(student / T)); multi-label: BCE of sigmoid(student / T) against sigmoid(teacher / T)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    if multi_label:
        return temperature ** 2 * F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))
    soft = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return temperature ** 2 * soft


def masked_hard_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, kind: str,
                     gamma: float, smoothing: float, multi_label: bool) -> torch.Tensor:
    """The hard-label loss over the rows that have a label (not UNLABELED), with the same weighting as
    hard_label_loss / label_set_loss; 0 for a batch with none. No host sync: the mask stays on the device."""
    logits = logits.float()
    labelled = (labels[:, 0] if multi_label else labels) != UNLABELED
    safe = labels.clamp_min(0)
    if multi_label:
        target = safe.float() * (1 - smoothing) + smoothing / 2 if smoothing else safe.float()
        per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
        if kind == "focal":
            p = torch.sigmoid(logits)
            per = (1 - (p * target + (1 - p) * (1 - target))) ** gamma * per
        per, row_weight = per.mean(dim=1), torch.ones_like(logits[:, 0])
    else:
        per = F.cross_entropy(logits, safe, weight=weight if kind == "cross_entropy" else None, reduction="none",
                              label_smoothing=smoothing)
        row_weight = weight[safe] if weight is not None else torch.ones_like(per)
        if kind == "focal":
            p_true = F.log_softmax(logits, dim=-1).gather(1, safe[:, None]).squeeze(1).exp()
            per = (1 - p_true) ** gamma * per * row_weight
    mask = labelled.float()
    return (per * mask).sum() / (row_weight * mask).sum().clamp_min(1e-12)


def hard_loss(tc: TrainConfig, multi_label: bool, train_labels: np.ndarray, names: list[str],
              device: torch.device, unlabeled: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(logits, labels) for train.* on this data (`train_labels`: the labelled rows). `unlabeled`: some
    training rows are UNLABELED (distill.unlabeled), and the loss skips them."""
    weight = class_weights(tc.class_weights, train_labels, names, multi_label)
    weight = weight.to(device) if weight is not None else None
    if unlabeled:
        return lambda logits, labels: masked_hard_loss(logits, labels, weight, tc.loss, tc.focal_gamma,
                                                       tc.label_smoothing, multi_label)
    loss = label_set_loss if multi_label else hard_label_loss
    return lambda logits, labels: loss(logits, labels, weight, tc.loss, tc.focal_gamma, tc.label_smoothing)
