"""The learning-rate schedule of `fit`: linear warm-up, then cosine down to the end of the budget.

Plain Python (no torch), so `vidcap plan` can print a schedule without loading torch.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """LR multiplier for `LambdaLR`: linear `warmup_lr -> lr` over `warmup_steps`, cosine to `min_lr`.

    Step `total_steps` reaches exactly `min_lr`. A plain object of floats, so the scheduler's
    state dict holds it and loads with `torch.load(weights_only=True)`.
    """

    def __init__(self, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int):
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress_ = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress_))

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr if self.lr else 0.0
