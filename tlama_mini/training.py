"""Training utilities: the learning-rate schedule (more of the loop lives in trainer.py)."""
from __future__ import annotations

import math
from collections.abc import Callable


def get_lr_scheduler(max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Linear warmup from max_lr / warmup_steps to max_lr over `warmup_steps`, then cosine decay to
    `min_lr` at `max_steps`, then constant `min_lr`. Returns a function step -> learning rate."""
    if max_lr < 0 or min_lr < 0 or min_lr > max_lr:
        raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
    if warmup_steps < 0 or max_steps <= 0 or warmup_steps > max_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= max_steps ({max_steps}) and max_steps > 0")

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        if step >= max_steps:
            return min_lr
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)

    return lr_at
