"""The training loop shared by `train` (cross-entropy) and `scst` (self-critical).

A stage hands `fit` a model, an *objective* and data; the objective is a small function

    objective(model, batch) -> (loss, logs)     # batch: {"video_ids", "frame_tokens", "captions"}

so CE and SCST differ only in that function. Everything else is shared, once:

* DDP (`pipeline.runtime.distributed`): NCCL on CUDA, gloo on CPU; rank 0 alone writes files. The
  configured batch is the global batch: per rank it is `batch / world_size / grad_accum`
  per micro-step.
* AdamW and the warmup-then-cosine schedule (`pipeline.optim`); gradient clipping and
  accumulation here. Mixed precision (bf16 autocast on CUDA, never fp16) is the model's own.
* Checkpoints (`pipeline.checkpoints`) every `checkpoint_every` steps and at each epoch end.
  A re-run resumes from the latest and, on CPU, reproduces the uninterrupted run bit for bit
  (the data plan is a function of (seed, epoch), RNG states are restored).
* Validation at the start and after each epoch: greedy captions for the validation videos,
  scored with CIDEr-D (document frequencies of the validation references, like coco-caption).
  Greedy and not the beam search of `eval`: several times cheaper, and it ranks checkpoints the
  same way in practice; `eval` reports the beam-search numbers. The best model is kept in
  `<stage>/best/` in `VideoCaptioner.save_trained` format, with `best/val_score.json`.
* Logs (`pipeline.runtime.runlog`): `metrics.jsonl`, TensorBoard events when tensorboard is
  installed, and `curves.png`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.annotations import load_manifest
from pipeline.checkpoints import (
    LoopState,
    check_checkpoint_plan,
    check_checkpoint_settings,
    latest_checkpoint,
    load_checkpoint,
    recover_dir,
    replace_dir,
    save_checkpoint,
    seed_everything,
)
from pipeline.cider import CiderD, simple_tokenize
from pipeline.config import Config, stage_settings
from pipeline.data import (
    Sharding,
    TrainPlan,
    check_batch_split,
    iterate_videos,
    make_loader,
    make_source,
    to_device,
)
from pipeline.optim import LoopSettings, build_optimizer
from pipeline.runtime.distributed import DistEnv, barrier, broadcast, gather
from pipeline.runtime.files import atomic_write_json
from pipeline.runtime.runlog import MetricsLog
from pipeline.runtime.stage import Stage, StageError, progress

Objective = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]

BEST = "best"
BEST_SCORE_FILE = "val_score.json"


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
    validator: Callable[..., tuple[float, dict[str, Any]]] = validate
    """`(model, source, validation, env) -> (score, predictions)`: CIDEr-D here, accuracy for QA."""


def fit(model: Any, objective: Objective, job: Job) -> dict[str, Any]:
    """Train `model` with `objective` over `job.plan`; resume, validate, checkpoint, log. Returns a summary."""
    env, settings, plan = job.env, job.settings, job.plan
    check_batch_split(
        settings.batch_size, env.world_size, settings.grad_accum, settings.batch_key, settings.accum_key
    )
    sharding = Sharding(settings.batch_size, env.world_size, env.rank, settings.grad_accum)
    # `max_steps` (SCST: the paper's 20k iterations) sets the length when given; else the epochs.
    total_steps = settings.max_steps or plan.steps_per_epoch * settings.epochs
    optimizer, scheduler = build_optimizer(model, settings, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped: torch.nn.Module = _ObjectiveModule(model, objective)
    if env.ddp:
        # Every trainable parameter gets a gradient in every step (the tests check frozen, LoRA and
        # full), so DDP need not search the graph for unused ones (find_unused_parameters=False).
        device_ids = [env.local_rank] if env.device.startswith("cuda") else None
        wrapped = DDP(wrapped, device_ids=device_ids, broadcast_buffers=False)

    best_dir = job.stage_dir / BEST
    recover_dir(best_dir)
    state, resumed = LoopState(), latest_checkpoint(job.stage_dir)
    if resumed is not None:
        check_checkpoint_settings(resumed, job.fingerprint_settings)
        check_checkpoint_plan(resumed, plan.steps_per_epoch, total_steps)
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
        cider, predictions = job.validator(model, job.source, job.validation, env)
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


def build_job(
    config: Config,
    model: Any,
    stage: Any,
    env: Any,
    settings: LoopSettings,
    captions: str = "sample",
    start_is_candidate: bool = False,
) -> Job:
    """The data (from `train.source`), validation set and loop settings shared by `train` and `scst`."""

    source_kind = config.train.source
    manifest = load_manifest(config.data)
    train_records = manifest.split(config.data.train_split)
    val_records = manifest.split(config.data.val_split)
    source = make_source(config, model, train_records + val_records, source_kind)
    available = set(source.available([r.video_id for r in train_records + val_records]))
    skipped = [r.video_id for r in train_records + val_records if r.video_id not in available]
    if skipped:
        stage.log.warning(
            "%d videos are not in the %s (failed or not extracted), e.g. %s; training without them",
            len(skipped),
            source_kind,
            ", ".join(skipped[:5]),
        )
    train_records = [r for r in train_records if r.video_id in available]
    val_ids = [r.video_id for r in val_records if r.video_id in available and r.captions]
    if config.train.val_max_videos:
        val_ids = val_ids[: config.train.val_max_videos]
    if not train_records:
        raise StageError(
            f"no training video of split {config.data.train_split!r} is available from the {source_kind}"
        )
    plan = TrainPlan(
        train_records, config.run.seed, captions, num_views=source.num_views, global_batch=settings.batch_size
    )
    validation = Validation(
        val_ids,
        {r.video_id: list(r.captions) for r in val_records},
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        min_new_tokens=config.eval.min_new_tokens,
    )
    return Job(
        plan,
        source,
        settings,
        validation,
        stage.dir,
        env,
        stage.log,
        fingerprint_settings=stage.settings,
        start_is_candidate=start_is_candidate,
    )


def best_model_dir(run_dir: str | Path) -> Path:
    """`<run>/scst/best` when SCST ran, else `<run>/train/best`."""
    run_dir = Path(run_dir)
    for stage in ("scst", "train"):
        if (run_dir / stage / BEST / BEST_SCORE_FILE).is_file():
            return run_dir / stage / BEST
    raise StageError(
        f"{run_dir} holds no trained model (no scst/best/ nor train/best/): run the train stage first"
    )
