"""The training loop shared by `train` (cross-entropy) and `scst` (self-critical).

A stage hands `fit` a model, an *objective* and data; the objective is a small function

    objective(model, batch) -> (loss, logs)     # batch: {"video_ids", "frame_tokens", "captions"}

so CE and SCST differ only in that function. Everything else is shared, once:

* DDP (`pipeline.runtime.distributed`): NCCL on CUDA, gloo on CPU; rank 0 alone writes files. The
  configured batch is the global batch: per rank and micro-step it is `gpu_batch` (the
  accumulation follows from the number of processes), or `batch / world_size / grad_accum`.
* AdamW and the warmup-then-cosine schedule over the whole budget (`max_steps`, else the
  epochs; `pipeline.optim`); gradient clipping and accumulation here. Mixed precision (bf16
  autocast on CUDA, never fp16) is the model's own.
* Checkpoints (`pipeline.checkpoints`) every `checkpoint_every` steps and at each validation.
  A re-run resumes from the latest, also in the middle of an epoch, and, on CPU, reproduces the
  uninterrupted run bit for bit (the data plan is a function of (seed, epoch), RNG states are restored).
* Validation at the start and every `val_every` steps (an "inner epoch"), else after each epoch,
  scored against the validation references (document frequencies of those references, like
  coco-caption). `select: cider`: greedy captions, CIDEr-D (cheap); `beam_cider_bleu4`: `eval`'s
  beam search, CIDEr-D + BLEU-4 (LAVIS's choice). The best model is kept in `<stage>/best/` in
  `VideoCaptioner.save_trained` format, with its scores in `best/val_score.json`.
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
from pycocoevalcap.bleu.bleu import Bleu
from torch.nn.parallel import DistributedDataParallel as DDP

from cache.store import FeatureStore, StoreError
from pipeline.annotations import load_manifest, require_references
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
from pipeline.sharding import shard, unsharded

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
    min_new_tokens: int | None = None  # None: the model flavour's seed rule
    num_beams: int = 1
    select: str = "cider"
    """`cider`: CIDEr-D; `beam_cider_bleu4`: CIDEr-D + BLEU-4 (LAVIS's `agg_metrics`), with `num_beams`."""


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


def validate(
    model: Any, source: Any, val: Validation, env: DistEnv
) -> tuple[dict[str, float], dict[str, str]]:
    """Captions of the validation videos (sharded over ranks) and their scores (rank 0's, shared).

    Scores: `val_cider` (CIDEr-D), with `select: beam_cider_bleu4` also `val_bleu4`, and `val_score`,
    the number the best checkpoint is chosen by.
    """
    was_training = model.training
    model.eval()
    mine = generate_captions(
        model,
        source,
        val.video_ids[env.rank :: env.world_size],
        val.batch_size,
        env.device,
        num_beams=val.num_beams,
        max_new_tokens=val.max_new_tokens,
        min_new_tokens=val.min_new_tokens,
    )
    model.train(was_training)
    predictions: dict[str, str] = {}
    for part in gather(env, mine):
        predictions.update(part)
    scores = {"val_cider": 0.0}
    if env.master_process and predictions:
        gts = {v: [simple_tokenize(c) for c in val.references[v]] for v in predictions}
        res = {v: [simple_tokenize(c)] for v, c in predictions.items()}
        scores["val_cider"] = float(CiderD().compute_score(gts, res)[0])  # df of these references, as coco
        if val.select == "beam_cider_bleu4":
            scores["val_bleu4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    scores = broadcast(env, scores)
    scores["val_score"] = scores["val_cider"] + scores.get("val_bleu4", 0.0)
    return scores, predictions


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
    validator: Callable[..., tuple[dict[str, float], dict[str, Any]]] = validate
    """`(model, source, validation, env) -> (scores, predictions)` as `validate`; QA: accuracy (`pipeline.qa`)."""


def fit(model: Any, objective: Objective, job: Job) -> dict[str, Any]:
    """Train `model` with `objective` over `job.plan`; resume, validate, checkpoint, log. Returns a summary."""
    loop = _Loop(model, objective, job)
    loop.resume_or_seed()
    if loop.state.global_step == 0 and not loop.state.history:
        loop.validate_and_keep_best(0, trained=False)  # the starting model is validation round 0
    model.train()
    for step in progress(
        range(loop.state.global_step, loop.total_steps),
        total=loop.total_steps,
        initial=loop.state.global_step,
        desc=f"{job.stage_dir.name} steps",
        disable=not job.env.master_process,
    ):
        loop.optimizer_step(step)
        done = loop.state.global_step
        validate_now = done % loop.val_every == 0 or done == loop.total_steps
        checkpoint_now = validate_now or done % job.settings.checkpoint_every == 0
        if done % job.settings.log_every == 0 or checkpoint_now:
            loop.log_window(step)
        if validate_now:
            loop.validate_and_keep_best(math.ceil(done / loop.val_every), trained=True)
        if checkpoint_now:
            loop.save_checkpoint()
    model.eval()
    loop.metrics.close()
    barrier(job.env)
    return loop.summary()


class _Loop:
    """The state of one `fit`: optimiser, schedule, data position, best model, logs.

    A validation "round" is `settings.val_every` steps (an inner epoch), else one epoch of the plan;
    the round's number is the `epoch` of its records (0: the starting model).
    """

    def __init__(self, model: Any, objective: Objective, job: Job):
        self.model, self.job, self.env, self.settings, self.plan = model, job, job.env, job.settings, job.plan
        _, self.grad_accum = self.settings.accumulation(self.env.world_size)  # an error names the keys
        self.sharding = Sharding(
            self.settings.batch_size, self.env.world_size, self.env.rank, self.grad_accum
        )
        self.total_steps = self.settings.total_steps(self.plan.steps_per_epoch)
        self.val_every = self.settings.val_every or self.plan.steps_per_epoch
        self.wrapped: torch.nn.Module = _ObjectiveModule(model, objective)
        self.sharded = self.env.ddp and self.settings.sharding == "fsdp"
        if self.sharded:  # before the optimizer: its parameters become shards (pipeline.sharding)
            shard(self.wrapped, model.language_model)
        self.optimizer, self.scheduler = build_optimizer(model, self.settings, self.total_steps)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if self.env.ddp and not self.sharded:
            # Every trainable parameter gets a gradient in every step (the tests check frozen, LoRA and
            # full), so DDP need not search the graph for unused ones (find_unused_parameters=False).
            device_ids = [self.env.local_rank] if self.env.device.startswith("cuda") else None
            self.wrapped = DDP(self.wrapped, device_ids=device_ids, broadcast_buffers=False)
        self.best_dir = job.stage_dir / BEST
        self.state, self.window, self.loader_iter = LoopState(), _Window(), None
        self.checkpoint_meta = {
            "settings": job.fingerprint_settings,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
        }

    def resume_or_seed(self) -> None:
        """Continue from the latest checkpoint (same settings and plan), else seed a fresh run."""
        recover_dir(self.best_dir)
        resumed = latest_checkpoint(self.job.stage_dir)
        if resumed is not None:
            check_checkpoint_settings(resumed, self.job.fingerprint_settings)
            check_checkpoint_plan(resumed, self.plan.steps_per_epoch, self.total_steps)
            self.state = load_checkpoint(resumed, self.model, self.optimizer, self.scheduler, self.env)
            self.job.log.info(
                "resuming from %s (step %d of %d)", resumed, self.state.global_step, self.total_steps
            )
        else:  # a seed independent of what building the model consumed
            seed_everything(self.settings.seed + self.env.rank)
        first = self.state.global_step if resumed else None
        self.metrics = MetricsLog(self.job.stage_dir, self.env.master_process, first)

    def _loader(self, epoch: int, start_step: int) -> Any:
        """This rank's micro-batches of `epoch` from `start_step` on (a resumed epoch starts mid-way)."""
        pin_memory = self.env.device.startswith("cuda")
        return make_loader(
            self.plan,
            self.job.source,
            epoch,
            self.sharding,
            start_step,
            self.settings.num_workers,
            pin_memory,
        )

    def optimizer_step(self, step: int) -> None:
        """One optimiser step = `grad_accum` micro-batches; DDP syncs gradients on the last only."""
        epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
        if self.loader_iter is None or step_in_epoch == 0:
            self.loader_iter = iter(self._loader(epoch, step_in_epoch))
        for micro in range(self.grad_accum):
            batch = to_device(next(self.loader_iter), self.job.source, self.env.device)
            sync = micro == self.grad_accum - 1
            replicas = self.env.ddp and not self.sharded  # FSDP reduce-scatters every micro-batch
            with self.wrapped.no_sync() if replicas and not sync else contextlib.nullcontext():
                loss, logs = self.wrapped(batch)
                (loss / self.grad_accum).backward()
            self.window.add(logs, loss, 1.0 / self.grad_accum)
        clip = self.settings.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip) if clip else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window.end_step(grad_norm, lr)
        self.state.global_step = step + 1

    def log_window(self, step: int) -> None:
        """Write the mean of the steps since the last write (one device sync)."""
        record = self.window.flush(self.env)
        self.state.epoch_loss_sum += record["loss"] * record["steps"]
        self.state.epoch_loss_steps += record["steps"]
        epoch = step // self.plan.steps_per_epoch + 1
        self.metrics.write({"kind": "step", "epoch": epoch, "step": self.state.global_step, **record})
        self.job.log.info(
            "step %d/%d epoch %d: loss %.4f lr %.2e (%.2f steps/s)",
            self.state.global_step,
            self.total_steps,
            epoch,
            record["loss"],
            record["lr"],
            record["steps_per_s"],
        )

    def validate_and_keep_best(self, round_: int, trained: bool) -> None:
        """Validate, keep the best in `best/`, log, plot; round 0 is the starting model."""
        state, started = self.state, time.time()
        with unsharded(self.wrapped):  # FSDP: full weights, so ranks caption independently
            scores, predictions = self.job.validator(
                self.model, self.job.source, self.job.validation, self.env
            )
        cider = state.last_cider = scores["val_cider"]
        if round_ == 0:
            state.start_cider = cider
        # Without validation videos (train.allow_no_validation) the latest trained round is kept.
        unranked = trained and not self.job.validation.video_ids
        improved = (trained or self.job.start_is_candidate) and (
            scores["val_score"] > state.best_score or unranked
        )
        if improved:
            state.best_cider, state.best_score = cider, scores["val_score"]
            state.best_epoch, state.best_step = round_, state.global_step
            self._save_best({**scores, "epoch": round_, "step": state.global_step})
        train_loss = state.epoch_loss_sum / state.epoch_loss_steps if state.epoch_loss_steps else None
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
        state.history.append({"epoch": round_, "step": state.global_step, **scores})
        self.metrics.write(
            {
                "kind": "epoch",
                "epoch": round_,
                "step": state.global_step,
                **scores,
                "train_loss": train_loss,
                "best": improved,
                "val_seconds": round(time.time() - started, 2),
            }
        )
        if self.env.master_process:
            atomic_write_json(self.job.stage_dir / "val" / f"epoch_{round_:03d}.json", predictions)
        loss_text = f"{train_loss:.4f}" if train_loss is not None else "-"
        self.job.log.info(
            "epoch %d (step %d): val %s %.4f%s, train loss %s",
            round_,
            state.global_step,
            "accuracy" if "val_accuracy" in scores else "CIDEr-D",  # QA validates by accuracy
            cider,
            " (best)" if improved else "",
            loss_text,
        )
        self.metrics.plot()

    def save_checkpoint(self) -> None:
        """Every rank calls it (their RNG states are gathered); rank 0 writes."""
        args = (self.optimizer, self.scheduler, self.state, self.env, self.checkpoint_meta)
        with unsharded(self.wrapped):  # FSDP: checkpoints hold full tensors
            save_checkpoint(self.job.stage_dir, self.model, *args)

    def _save_best(self, score: dict[str, Any]) -> None:
        with unsharded(self.wrapped):  # every rank gathers (FSDP); rank 0 writes
            if self.env.master_process:
                replace_dir(
                    self.best_dir,
                    lambda tmp: (
                        self.model.save_trained(tmp),
                        atomic_write_json(tmp / BEST_SCORE_FILE, score),
                    ),
                )

    def summary(self) -> dict[str, Any]:
        state, steps_per_epoch = self.state, self.plan.steps_per_epoch
        return {
            "best_val_cider": state.best_cider,
            "select": self.settings.select,
            "best_epoch": state.best_epoch,
            "best_step": state.best_step,
            "start_val_cider": state.start_cider,
            "final_val_cider": state.last_cider,
            "epochs": math.ceil(self.total_steps / steps_per_epoch),
            "steps": self.total_steps,
            "steps_per_epoch": steps_per_epoch,
            "best_path": str(self.best_dir),
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
            stage = Stage(config, name, force=force, extra_inputs=_cache_state(config, name))
        except StageError as e:
            error = str(e)
    error, done, summary = broadcast(
        env, (error, stage.done if stage else False, stage.summary if stage else {})
    )
    if error:
        raise StageError(error)
    return stage if stage is not None else _FollowerStage(config, name, env, done, summary)


def _cache_state(config: Any, name: str) -> dict[str, Any]:
    """What `train` read from the cache: finishing an extraction afterwards makes it stale."""
    if name != "train" or config.train.source != "cache" or not config.cache_path.exists():
        return {}
    try:
        store = FeatureStore.open(config.cache_path)
        done, failed = store.done_ids(), set(store.failed())
    except StoreError:
        return {}  # make_source says what is wrong with it
    manifest = load_manifest(config.data)
    ids = [
        r.video_id
        for split in (config.data.train_split, config.data.val_split)
        for r in manifest.split(split)
    ]
    return {"cache": {"done": sum(v in done for v in ids), "failed": sum(v in failed for v in ids)}}


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
    start_is_candidate: bool = False,
) -> Job:
    """The data (from `train.source`), validation set and loop settings shared by `train` and `scst`."""

    source_kind = config.train.source
    manifest = load_manifest(config.data)
    for split in (config.data.train_split, config.data.val_split):
        require_references(manifest, split)  # before any training or captioning
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
    _refuse_a_partial_cache(config, source, train_records + val_records, available)
    train_records = [r for r in train_records if r.video_id in available]
    val_ids = [r.video_id for r in val_records if r.video_id in available and r.captions]
    if config.train.val_max_videos:
        val_ids = val_ids[: config.train.val_max_videos]
    if not train_records:
        raise StageError(
            f"no training video of split {config.data.train_split!r} is available from the {source_kind}"
        )
    if not val_ids and not config.train.allow_no_validation:
        raise StageError(
            f"no video of the validation split {config.data.val_split!r} with captions is available from "
            f"the {source_kind} ({len(val_records)} in the annotations): validation CIDEr would be 0 every "
            "epoch and best/ meaningless; extract them (extract.splits), or set "
            "train.allow_no_validation=true to keep the last epoch's model"
        )
    plan = TrainPlan(
        train_records,
        config.run.seed,
        settings.captions,
        num_views=source.num_views,
        global_batch=settings.batch_size,
        fresh_views=source.fresh_views,
    )
    validation = Validation(
        val_ids,
        {r.video_id: list(r.captions) for r in val_records},
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        min_new_tokens=config.eval.min_new_tokens,
        num_beams=config.eval.num_beams if settings.select == "beam_cider_bleu4" else 1,
        select=settings.select,
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


def _refuse_a_partial_cache(config: Config, source: Any, records: list[Any], available: set[str]) -> None:
    """Videos neither done nor failed in the cache (extraction unfinished) stop training unless opted in."""
    store = getattr(source, "store", None)
    if store is None or config.train.allow_partial_cache:
        return
    unsettled = set(store.pending_ids(retry_failed=False))  # in the store, neither done nor failed
    pending = [r.video_id for r in records if r.video_id in unsettled]
    if pending:
        raise StageError(
            f"{len(pending)} of {len(records)} videos of splits {config.data.train_split!r} and "
            f"{config.data.val_split!r} are not extracted yet in {store.path} (e.g. {', '.join(pending[:3])}): "
            "finish `vidcap extract` first, or set train.allow_partial_cache=true to train without them "
            "(finishing the extraction later makes this training stale)"
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
