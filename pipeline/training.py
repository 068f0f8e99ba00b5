"""The training loop shared by `train` (cross-entropy) and `scst` (self-critical).

A stage hands `fit` a model, an *objective* and data; the objective is a small function

    objective(model, batch) -> (loss, logs)     # batch: {"video_ids", "frame_tokens", "captions"}

so CE and SCST differ only in that function. Everything else lives here, once:

* DDP: a plain block keyed on torchrun's `RANK` / `LOCAL_RANK` / `WORLD_SIZE` (NCCL on CUDA,
  gloo on CPU); `master_process` (rank 0) alone writes files. The configured batch is the
  global batch: per rank it is `batch / world_size / grad_accum` per micro-step.
* AdamW without weight decay on biases, norms, embeddings and query tokens; linear warmup
  from `warmup_lr` to `lr`, then cosine down to `min_lr` at the last step; gradient clipping
  and accumulation. Mixed precision (bf16 autocast on CUDA, never fp16) is the model's own.
* Checkpoints every `checkpoint_every` steps and at each epoch end, in
  `<stage>/checkpoints/step_XXXXXXXX/`: trainable weights (safetensors), optimizer, scheduler,
  every rank's RNG states, the data position and the best score so far. A checkpoint is built
  in a hidden folder and renamed into place, so a kill leaves the previous ones intact; the
  last two are kept. A re-run resumes from the latest and, on CPU, reproduces the uninterrupted
  run bit for bit (the data plan is a function of (seed, epoch), RNG states are restored).
* Validation at the start and after each epoch: greedy captions for the validation videos,
  scored with CIDEr-D (document frequencies of the validation references, like coco-caption).
  Greedy and not the beam search of `eval`: several times cheaper, and it ranks checkpoints the
  same way in practice; `eval` reports the beam-search numbers. The best model is kept in
  `<stage>/best/` in `VideoCaptioner.save_trained` format, with `best/val_score.json`.
* Logs: `metrics.jsonl` (`kind: step` every `log_every` steps, `kind: epoch` per validation),
  TensorBoard events in `tensorboard/` when tensorboard is installed, and `curves.png`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data import Sharding, TrainPlan, check_batch_split, iterate_videos, make_loader, to_device
from pipeline.stage import StageError, atomic_write_bytes, atomic_write_json, progress, resolve_device

Objective = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]

CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_SCORE_FILE = "val_score.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
KEEP_CHECKPOINTS = 2
NO_DECAY_NAMES = ("bias", "norm", "embed", "query_tokens")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


# ---------------------------------------------------------------------------------------
# Distributed setup (torchrun)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master_process(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_spec: str = "auto") -> DistEnv:
    """Join the torchrun process group when `RANK` is set; otherwise a single process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return DistEnv(device=resolve_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_spec)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        atexit.register(_destroy_process_group)
    return DistEnv(rank, local_rank, world_size, device)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.ddp:
        dist.barrier()


def broadcast(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not env.ddp:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule
# ---------------------------------------------------------------------------------------


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
    """0: epochs decide."""
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
    groups += [
        {"params": ps, "weight_decay": 0.0, "lr_scale": lr_scales[k]} for k, ps in scaled.items() if ps
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
    groups = param_groups(model, settings.weight_decay, {"temporal_embeddings": settings.temporal_lr_scale})
    for group in groups:
        group["lr"] = settings.lr * group.pop("lr_scale", 1.0)  # LambdaLR scales every group alike
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), **fused)
    schedule = WarmupCosine(
        settings.lr, settings.min_lr, settings.warmup_lr, settings.warmup_steps, total_steps
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Where training is; saved in every checkpoint."""

    global_step: int = 0
    best_cider: float = -1.0
    best_epoch: int = -1
    best_step: int = -1
    start_cider: float | None = None
    last_cider: float | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Validation results: [{"epoch", "step", "val_cider"}]."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain lists (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    folder = stage_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def save_checkpoint(
    stage_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: LoopState,
    env: DistEnv,
    meta: dict[str, Any],
) -> Path | None:
    """Write `checkpoints/step_XXXXXXXX/` atomically (rank 0); every rank must call it (RNG gather)."""
    from safetensors.torch import save_file

    rngs = gather(env, rng_state())
    if not env.master_process:
        return None
    folder = stage_dir / CHECKPOINTS
    final = folder / f"step_{state.global_step:08d}"
    tmp = folder / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.trainable_state_dict().items()
    }
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "state": asdict(state),
        },
        tmp / "state.pt",
    )
    atomic_write_json(tmp / "meta.json", {**meta, "step": state.global_step, "world_size": env.world_size})
    _fsync_tree(tmp)
    if final.exists():  # a stale one from before a resume: replaced
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(folder)
    for old in sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, env: DistEnv) -> LoopState:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; return the loop state."""
    from safetensors.torch import load_file

    model.load_trainable_state_dict(load_file(str(path / "trainable.safetensors"), device=str(env.device)))
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = LoopState(**saved["state"])
    rngs = saved["rng"]
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    else:  # resumed on another number of processes: data order is unaffected, dropout is reseeded
        seed_everything(state.global_step * 1000 + env.rank)
    return state


def check_checkpoint_settings(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint written under other stage settings."""
    from pipeline.config import diff_settings

    saved = json.loads((path / "meta.json").read_text()).get("settings", {})
    changes = diff_settings(saved, settings)
    if changes:
        raise StageError(
            f"{path} was written with other settings:\n  "
            + "\n  ".join(changes)
            + "\nre-run with --force to start this stage over, or restore the settings to resume"
        )


def replace_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Replace folder `target` by what `write(tmp)` puts in a fresh folder, never leaving neither.

    A kill between the two renames leaves `.<name>.old`; `recover_dir` puts it back.
    """
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    _fsync_tree(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.rename(old, target)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@dataclass
class Validation:
    """The validation videos and how to caption them."""

    video_ids: list[str]
    references: dict[str, list[str]]
    """Raw reference captions per video (tokenised with `simple_tokenize` for scoring)."""
    batch_size: int = 16
    max_new_tokens: int = 32
    min_new_tokens: int = 5


@torch.no_grad()
def generate_captions(
    model: Any, source: Any, video_ids: Sequence[str], batch_size: int, device: str, **generate: Any
) -> dict[str, str]:
    """`{video_id: caption}` for view 0 of each video (`generate` kwargs go to `model.generate`).

    A video the source cannot read (an undecodable file) is skipped and logged, not fatal.
    """
    captions = {}
    for ids in iterate_videos(video_ids, batch_size):
        loaded, kept = source.reader.load(ids, [0] * len(ids))
        out = model.generate(source.encode(loaded, device), **generate)
        captions.update(zip([ids[i] for i in kept], out.texts, strict=True))
    return captions


def validate(model: Any, source: Any, val: Validation, env: DistEnv) -> tuple[float, dict[str, str]]:
    """Greedy captions of the validation videos (sharded over ranks) and their CIDEr-D (rank 0's)."""
    from pipeline.cider import CiderD, simple_tokenize

    was_training = model.training
    model.eval()
    mine = generate_captions(
        model,
        source,
        val.video_ids[env.rank :: env.world_size],
        val.batch_size,
        env.device,
        num_beams=1,
        max_new_tokens=val.max_new_tokens,
        min_new_tokens=val.min_new_tokens,
    )
    model.train(was_training)
    predictions: dict[str, str] = {}
    for part in gather(env, mine):
        predictions.update(part)
    score = 0.0
    if env.master_process and predictions:
        gts = {v: [simple_tokenize(c) for c in val.references[v]] for v in predictions}
        res = {v: [simple_tokenize(c)] for v, c in predictions.items()}
        score, _ = CiderD().compute_score(gts, res)  # parity mode: df of these references, as coco-caption
    return float(broadcast(env, score)), predictions


# ---------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------


class MetricsLog:
    """`metrics.jsonl` (+ TensorBoard) on rank 0; on resume, records past the checkpoint are dropped."""

    def __init__(self, stage_dir: Path, enabled: bool, resume_step: int | None):
        self.path = stage_dir / METRICS_FILE
        self.curves = stage_dir / CURVES_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r["step"] <= resume_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=purge)
        except Exception:  # tensorboard not installed: the jsonl and the png still have everything
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tb.flush()

    def plot(self) -> None:
        if self.enabled:
            plot_curves(read_metrics(self.path), self.curves)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], out: Path) -> None:
    """Training loss (per logged step and per epoch), reward when present, validation CIDEr per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    panels = ["loss"] + (["reward"] if any("reward" in r for r in steps) else []) + ["val_cider"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, key in zip(axes, panels, strict=True):
        if key == "val_cider":
            ax.plot([r["epoch"] for r in epochs], [r["val_cider"] for r in epochs], "o-")
            ax.set_xlabel("epoch (0: starting model)")
            ax.set_title("validation CIDEr-D (greedy)")
            continue
        ax.plot(
            [r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], lw=1, label="steps"
        )
        if key == "loss":
            trained = [r for r in epochs if r.get("train_loss") is not None]
            ax.plot(
                [r["step"] for r in trained], [r["train_loss"] for r in trained], "o-", label="epoch mean"
            )
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_title(f"training {key}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


class _ObjectiveModule(torch.nn.Module):
    """The model with `forward = objective`: DDP synchronises gradients only through `forward`."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.objective(self.model, batch)


@dataclass
class Job:
    """Everything `fit` trains with, besides the model and the objective."""

    plan: TrainPlan
    source: Any
    settings: LoopSettings
    validation: Validation
    stage_dir: Path
    env: DistEnv
    log: logging.Logger
    fingerprint_settings: dict[str, Any] = field(default_factory=dict)
    """The stage's settings: a checkpoint written under others is not resumed."""
    start_is_candidate: bool = False
    """The starting model competes for `best/` (SCST: keep the CE model if SCST never beats it)."""


def fit(model: Any, objective: Objective, job: Job) -> dict[str, Any]:
    """Train `model` with `objective` over `job.plan`; resume, validate, checkpoint, log. Returns a summary."""
    env, settings, plan = job.env, job.settings, job.plan
    check_batch_split(
        settings.batch_size, env.world_size, settings.grad_accum, settings.batch_key, settings.accum_key
    )
    sharding = Sharding(settings.batch_size, env.world_size, env.rank, settings.grad_accum)
    total_steps = plan.steps_per_epoch * settings.epochs
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps)
    optimizer, scheduler = build_optimizer(model, settings, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped: torch.nn.Module = _ObjectiveModule(model, objective)
    if env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every trainable parameter gets a gradient in every step (the tests check frozen, LoRA and
        # full), so DDP need not search the graph for unused ones (find_unused_parameters=False).
        device_ids = [env.local_rank] if env.device.startswith("cuda") else None
        wrapped = DDP(wrapped, device_ids=device_ids, broadcast_buffers=False)

    best_dir = job.stage_dir / BEST
    recover_dir(best_dir)
    state, resumed = LoopState(), latest_checkpoint(job.stage_dir)
    if resumed is not None:
        check_checkpoint_settings(resumed, job.fingerprint_settings)
        state = load_checkpoint(resumed, model, optimizer, scheduler, env)
        job.log.info("resuming from %s (step %d of %d)", resumed, state.global_step, total_steps)
    else:
        seed_everything(settings.seed + env.rank)  # independent of what building the model consumed
    metrics = MetricsLog(job.stage_dir, env.master_process, state.global_step if resumed else None)
    ckpt_meta = {
        "settings": job.fingerprint_settings,
        "total_steps": total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
    }

    def end_of_epoch(epoch: int, trained: bool) -> None:
        """Validate, keep the best, log, plot; `epoch` 0 is the starting model."""
        started = time.time()
        cider, predictions = validate(model, job.source, job.validation, env)
        state.last_cider = cider
        if epoch == 0:
            state.start_cider = cider
        improved = (trained or job.start_is_candidate) and cider > state.best_cider
        if improved:
            state.best_cider, state.best_epoch, state.best_step = cider, epoch, state.global_step
            if env.master_process:
                score = {"val_cider": cider, "epoch": epoch, "step": state.global_step}
                replace_dir(
                    best_dir,
                    lambda tmp: (model.save_trained(tmp), atomic_write_json(tmp / BEST_SCORE_FILE, score)),
                )
        train_loss = state.epoch_loss_sum / state.epoch_loss_steps if state.epoch_loss_steps else None
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
        state.history.append({"epoch": epoch, "step": state.global_step, "val_cider": cider})
        metrics.write(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": state.global_step,
                "val_cider": cider,
                "train_loss": train_loss,
                "best": improved,
                "val_seconds": round(time.time() - started, 2),
            }
        )
        if env.master_process:
            atomic_write_json(job.stage_dir / "val" / f"epoch_{epoch:03d}.json", predictions)
        job.log.info(
            "epoch %d (step %d): val CIDEr-D %.4f%s, train loss %s",
            epoch,
            state.global_step,
            cider,
            " (best)" if improved else "",
            f"{train_loss:.4f}" if train_loss is not None else "-",
        )
        metrics.plot()

    if state.global_step == 0 and not state.history:
        end_of_epoch(0, trained=False)

    model.train()
    window = _Window()
    loader_iter = None
    for step in progress(
        range(state.global_step, total_steps),
        total=total_steps,
        initial=state.global_step,
        desc=f"{job.stage_dir.name} steps",
        disable=not env.master_process,
    ):
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        if loader_iter is None or step_in_epoch == 0:
            loader = make_loader(
                plan,
                job.source,
                epoch,
                sharding,
                step_in_epoch,
                settings.num_workers,
                pin_memory=env.device.startswith("cuda"),
            )
            loader_iter = iter(loader)

        # one optimiser step = grad_accum micro-batches; DDP syncs gradients on the last only
        for micro in range(settings.grad_accum):
            batch = to_device(next(loader_iter), job.source, env.device)
            sync = micro == settings.grad_accum - 1
            with wrapped.no_sync() if env.ddp and not sync else contextlib.nullcontext():
                loss, logs = wrapped(batch)
                (loss / settings.grad_accum).backward()
            window.add(logs, loss, 1.0 / settings.grad_accum)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip) if settings.grad_clip else None
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.end_step(grad_norm, lr)
        state.global_step = step + 1

        last_of_epoch = step_in_epoch == plan.steps_per_epoch - 1 or state.global_step == total_steps
        checkpoint_now = state.global_step % settings.checkpoint_every == 0 and not last_of_epoch
        if state.global_step % settings.log_every == 0 or checkpoint_now or last_of_epoch:
            record = window.flush(env)
            state.epoch_loss_sum += record["loss"] * record["steps"]
            state.epoch_loss_steps += record["steps"]
            metrics.write({"kind": "step", "epoch": epoch + 1, "step": state.global_step, **record})
            job.log.info(
                "step %d/%d epoch %d: loss %.4f lr %.2e (%.2f steps/s)",
                state.global_step,
                total_steps,
                epoch + 1,
                record["loss"],
                record["lr"],
                record["steps_per_s"],
            )
        if last_of_epoch:
            end_of_epoch(epoch + 1, trained=True)
            loader_iter = None
        if checkpoint_now or last_of_epoch:
            save_checkpoint(job.stage_dir, model, optimizer, scheduler, state, env, ckpt_meta)

    model.eval()
    metrics.close()
    barrier(env)
    return {
        "best_val_cider": state.best_cider,
        "best_epoch": state.best_epoch,
        "best_step": state.best_step,
        "start_val_cider": state.start_cider,
        "final_val_cider": state.last_cider,
        "epochs": math.ceil(total_steps / plan.steps_per_epoch),
        "steps": total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "best_path": str(best_dir),
        "history": state.history,
    }


class _Window:
    """Per-step logs since the last flush; tensors stay on the device until `flush` (one sync)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        self.started = time.time()

    def add(self, logs: dict[str, Any], loss: torch.Tensor, weight: float) -> None:
        for key, value in {"loss": loss.detach(), **logs}.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.current[key] = self.current.get(key, 0.0) + value * weight

    def end_step(self, grad_norm: torch.Tensor | None, lr: float) -> None:
        if grad_norm is not None:
            self.current["grad_norm"] = grad_norm.detach().float()
        self.current["lr"] = lr
        self.steps.append(self.current)
        self.current = {}

    def flush(self, env: DistEnv) -> dict[str, Any]:
        """Mean over the window's steps (and over ranks): plain floats."""
        keys = sorted(self.steps[0])
        values = torch.tensor([[float(s[k]) for k in keys] for s in self.steps], dtype=torch.float64).mean(0)
        if env.ddp:
            device = env.device if env.device.startswith("cuda") else "cpu"
            values = values.to(device)
            dist.all_reduce(values)
            values = (values / env.world_size).cpu()
        seconds = time.time() - self.started
        record = {k: round(float(v), 6) for k, v in zip(keys, values, strict=True)}
        record.update(steps=len(self.steps), steps_per_s=round(len(self.steps) / max(seconds, 1e-9), 4))
        self.steps, self.started = [], time.time()
        return record


# ---------------------------------------------------------------------------------------
# Stage bookkeeping under torchrun
# ---------------------------------------------------------------------------------------


class _FollowerStage:
    """What ranks other than 0 know of the stage (rank 0 alone owns its folder and DONE.json)."""

    def __init__(self, config: Any, name: str, env: DistEnv, done: bool, summary: dict[str, Any]):
        from pipeline.config import stage_settings

        self.name, self.dir, self.done, self.summary = name, config.stage_dir(name), done, summary
        self.settings = stage_settings(config, name)
        self.log = logging.getLogger(f"vidcap.{name}.rank{env.rank}")
        self.log.setLevel(logging.ERROR)  # rank 0 already reports everything else
        if not self.log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s rank {env.rank} %(name)s: %(message)s", "%H:%M:%S")
            )
            self.log.addHandler(handler)
        self.log.propagate = False


def open_stage(config: Any, name: str, force: bool, env: DistEnv) -> Any:
    """`Stage(config, name)` on rank 0, its decision shared with every rank.

    `--force` starts a training stage over (its checkpoints were made under other settings).
    """
    from pipeline.stage import Stage

    stage, error = None, None
    if env.master_process:
        try:
            stage = Stage(config, name, force=force, fresh_on_force=True)
        except StageError as e:
            error = str(e)
    error, done, summary = broadcast(
        env, (error, stage.done if stage else False, stage.summary if stage else {})
    )
    if error:
        raise StageError(error)
    return stage if stage is not None else _FollowerStage(config, name, env, done, summary)


def finish_stage(stage: Any, env: DistEnv, summary: dict[str, Any]) -> dict[str, Any]:
    """DONE.json from rank 0 once every rank is through; every rank returns the summary."""
    barrier(env)
    if env.master_process:
        summary = stage.finish(summary)
    return broadcast(env, summary)
