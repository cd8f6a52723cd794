"""The one optimisation loop of recycle's training (experts, gates, routers), :func:`optimise`,
and its learning-rate schedule: linear warm-up over ``warmup_steps`` (step 0 already above
zero), then constant or a linear decay to zero at ``steps``. A plain function: the loop
sets ``group["lr"]`` from it each step.

(transformers' ``get_*_schedule_with_warmup`` start at lr 0 on step 0, one wasted step; this
one does not, which is why it is not used here.)
"""

from __future__ import annotations

from typing import Callable, Iterator

from recycle.errors import RecycleError


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


def optimise(params: list, loss_fn: Callable, batches: Iterator[dict], steps: int, *, lr: float, warmup_steps: int,
             decay: bool = True, weight_decay: float = 0.0, device=None, what: str = "training",
             lower: str | None = "--lr", on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW on ``params`` for ``steps`` steps; returns each step's loss.

    Each step moves the next batch to ``device``, sets the learning rate (:func:`lr_at`),
    takes ``loss_fn(step, batch)``, refuses a loss that is not finite (a RecycleError:
    ``what`` diverged at step N, ``lower`` the option to lower), then zero_grad, backward,
    step, and ``on_step(step, loss)``. No gradient clipping.
    """
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    for step in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        set_lr(opt, lr_at(step, steps, warmup_steps, lr, decay=decay))
        loss = loss_fn(step, batch)
        if not torch.isfinite(loss):
            hint = f"; lower {lower}" if lower else ""
            raise RecycleError(f"{what} diverged at step {step + 1} (loss {loss.item()}){hint}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
