"""Knowledge distillation: teacher logits computed once on the training set, then
loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
(the task's soft loss: for a set of labels per text, binary cross-entropies against the teacher's sigmoid)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.config.schema import DistillConfig
from peftlab.errors import UserError
from peftlab.runtime import Runtime
from peftlab.tasks import SINGLE_LABEL, Task


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                 alpha: float, temperature: float) -> torch.Tensor:
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * hard + (1 - alpha) * SINGLE_LABEL.soft_loss(student_logits, teacher_logits, temperature)


def teacher_logits(cfg: DistillConfig, texts: list[str], label_names: list[str], runtime: Runtime,
                   cache_dir: str | None, batch_size: int = 64, task: Task = SINGLE_LABEL) -> np.ndarray:
    """Logits of the teacher run for the training texts (in their order), through the teacher's own
    tokenizer and max_length, computed once per run."""
    from peftlab.runs.trained import load_predictor

    predictor = load_predictor(cfg.teacher, runtime.device, batch_size=batch_size, what="distill.teacher",
                               precision=runtime.setting)  # the student's precision
    if predictor.label_names != label_names:
        raise UserError(f"distill.teacher {cfg.teacher!r} was trained on labels {predictor.label_names}, "
                        f"the student's are {label_names}: use a teacher trained on the same dataset")
    if predictor.task is not task:
        raise UserError(f"distill.teacher {cfg.teacher!r} is a {predictor.task.title} run and the student "
                        f"is {task.title}: use a teacher trained with the same {task.setting}")
    predictor.cache_dir = cache_dir
    logits = predictor.logits(texts)
    del predictor
    return logits
