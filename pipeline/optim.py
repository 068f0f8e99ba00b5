"""AdamW parameter groups and the warmup-then-cosine learning-rate schedule of `fit`.

`LoopSettings` is a stage's `OptimArgs` (the `train` or `scst` section: one schema) plus the run's
seed. Weight decay on weight matrices except `no_decay` names; linear warmup from `warmup_lr`
to `lr`, then cosine down to `min_lr` at the last step of the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import OptimArgs
from pipeline.schedule import WarmupCosine

NO_DECAY_NAMES = ("bias", "norm", "embed", "query_tokens")


@dataclass
class LoopSettings(OptimArgs):
    """What `fit` needs: a stage's `OptimArgs` (`train` or `scst` section) and the run's seed, workers."""

    seed: int = 0
    num_workers: int = 0
    temporal_lr_scale: float = 1.0
    section: str = "train"
    """The config section the settings come from (named in error messages)."""
    sharding: str = "none"
    """`run.sharding`: `fsdp` shards the model over the torchrun processes (pipeline.sharding)."""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

    @classmethod
    def from_config(cls, config: Any, section: str) -> LoopSettings:
        """The settings of `config.<section>` (`train` or `scst`); SCST reads its data workers and the
        temporal embeddings' LR scale from `train`."""
        args = getattr(config, section)
        shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimArgs)}
        return cls(
            **shared,
            seed=config.run.seed,
            num_workers=config.train.num_workers,
            temporal_lr_scale=config.train.temporal_lr_scale,
            section=section,
            sharding=config.run.sharding,
        )

    def total_steps(self, steps_per_epoch: int) -> int:
        """`max_steps` when set (an iteration budget), else `epochs` x steps per epoch."""
        return self.max_steps or steps_per_epoch * self.epochs


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_scales: dict[str, float] | None = None,
    no_decay_names: Sequence[str] = NO_DECAY_NAMES,
) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: decayed weight matrices, and the rest.

    No decay on any 1-d parameter, nor on names containing one of `no_decay_names` (by default
    biases, norms, embeddings and the query tokens: learned inputs, not weights of a linear map;
    LAVIS decays all but biases and norms). `lr_scales` maps a name fragment to a
    learning-rate multiplier: matching parameters get groups of their own (decayed by the same
    rule) with an `lr_scale` key that `build_optimizer` turns into the groups' learning rate.
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
        skip = p.ndim < 2 or any(k in name.lower() for k in no_decay_names)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for key, params in scaled.items():  # weights decay in their own scaled group too (a trained ViT's)
        named = {id(p): n for n, p in model.named_parameters()}
        split = {True: [], False: []}
        for p in params:
            split[p.ndim >= 2 and not any(k in named[id(p)].lower() for k in no_decay_names)].append(p)
        groups += [
            {"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": lr_scales[key]}
            for decays, ps in split.items()
            if ps
        ]
    return groups


def build_optimizer(model: torch.nn.Module, settings: LoopSettings, total_steps: int) -> tuple[Any, Any]:
    scales = {"temporal_embeddings": settings.temporal_lr_scale, **getattr(model, "lr_scales", {})}
    groups = param_groups(
        model, settings.weight_decay, scales, settings.no_decay
    )  # model.lr_scales: a trained ViT's
    for group in groups:
        group["lr"] = settings.lr * group.pop("lr_scale", 1.0)  # LambdaLR scales every group alike
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), **fused)
    schedule = WarmupCosine(
        settings.lr, settings.min_lr, settings.warmup_lr, settings.warmup_steps, total_steps
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
