"""Learning-rate schedule: a pure function of the step (so it needs no saved state)."""
import math


def get_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from 0 to max_lr, then cosine decay to max_lr * min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    min_lr = max_lr * min_lr_ratio
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
