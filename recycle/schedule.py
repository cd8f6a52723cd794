"""The one learning-rate schedule of recycle's training loops (experts, gates, routers):
linear warm-up over ``warmup_steps`` (step 0 already above zero), then constant or a linear
decay to zero at ``steps``. A plain function: loops set ``group["lr"]`` from it each step.

(transformers' ``get_*_schedule_with_warmup`` start at lr 0 on step 0, one wasted step; this
one does not, which is why it is not used here.)
"""

from __future__ import annotations


def lr_at(step: int, steps: int, warmup_steps: int, lr: float, *, decay: bool = True) -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if not decay:
        return lr
    rest = max(1, steps - warmup_steps)
    return lr * max(0.0, 1 - (step - warmup_steps) / rest)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
