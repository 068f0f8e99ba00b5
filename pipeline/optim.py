"""AdamW parameter groups and the warmup-then-cosine learning-rate schedule of `fit`.

No weight decay on biases, norms, embeddings and query tokens; linear warmup from `warmup_lr`
to `lr`, then cosine down to `min_lr` at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

NO_DECAY_NAMES = ("bias", "norm", "embed", "query_tokens")


@dataclass
class LoopSettings:
    """What `fit` needs from `TrainConfig` / `ScstConfig` (see `from_train`, `from_scst`)."""

    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    checkpoint_every: int
    log_every: int
    seed: int
    warmup_lr: float = 0.0
    grad_accum: int = 1
    max_steps: int = 0
    """Optimiser steps in all; 0: `epochs` x steps per epoch."""
    num_workers: int = 0
    temporal_lr_scale: float = 1.0
    batch_key: str = "train.batch_size"
    accum_key: str | None = "train.grad_accum"

    @classmethod
    def from_train(cls, config: Any) -> LoopSettings:
        t = config.train
        return cls(
            epochs=t.epochs,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            lr=t.lr,
            min_lr=t.min_lr,
            warmup_lr=t.warmup_lr,
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            checkpoint_every=t.checkpoint_every,
            log_every=t.log_every,
            seed=config.run.seed,
            num_workers=t.num_workers,
            temporal_lr_scale=t.temporal_lr_scale,
        )

    @classmethod
    def from_scst(cls, config: Any) -> LoopSettings:
        s = config.scst
        return cls(
            epochs=s.epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            min_lr=s.min_lr,
            warmup_lr=config.train.warmup_lr,
            warmup_steps=s.warmup_steps,
            weight_decay=s.weight_decay,
            grad_clip=s.grad_clip,
            checkpoint_every=s.checkpoint_every,
            log_every=s.log_every,
            seed=config.run.seed,
            max_steps=s.max_steps,
            num_workers=config.train.num_workers,
            temporal_lr_scale=config.train.temporal_lr_scale,
            batch_key="scst.batch_size",
            accum_key=None,
        )


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: decayed weight matrices, and the rest.

    No decay on biases, norms, embeddings and the query tokens (learned inputs, not weights
    of a linear map), nor on any 1-d parameter. `lr_scales` maps a name fragment to a
    learning-rate multiplier: matching parameters get a group of their own (no decay) with
    an `lr_scale` key that `build_optimizer` turns into the group's learning rate.
    """
    lr_scales = {k: v for k, v in (lr_scales or {}).items() if v != 1.0}
    decay, no_decay = [], []
    scaled: dict[str, list[torch.nn.Parameter]] = {key: [] for key in lr_scales}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in lr_scales if k in name), None)
        if key is not None:
            scaled[key].append(p)
            continue
        skip = p.ndim < 2 or any(k in name.lower() for k in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for key, params in scaled.items():  # weights decay in their own scaled group too (a trained ViT's)
        named = {id(p): n for n, p in model.named_parameters()}
        split = {True: [], False: []}
        for p in params:
            split[p.ndim >= 2 and not any(k in named[id(p)].lower() for k in NO_DECAY_NAMES)].append(p)
        groups += [
            {"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": lr_scales[key]}
            for decays, ps in split.items()
            if ps
        ]
    return groups


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


def build_optimizer(model: torch.nn.Module, settings: LoopSettings, total_steps: int) -> tuple[Any, Any]:
    scales = {"temporal_embeddings": settings.temporal_lr_scale, **getattr(model, "lr_scales", {})}
    groups = param_groups(model, settings.weight_decay, scales)  # model.lr_scales: e.g. a trained ViT's
    for group in groups:
        group["lr"] = settings.lr * group.pop("lr_scale", 1.0)  # LambdaLR scales every group alike
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), **fused)
    schedule = WarmupCosine(
        settings.lr, settings.min_lr, settings.warmup_lr, settings.warmup_steps, total_steps
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
