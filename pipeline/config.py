"""The configuration schema: one typed dataclass per section, loaded from YAML.

A config file is a YAML mapping of sections (``run``, ``data``, ``decode``, ``model``,
``cache``, ``extract``, ``train``, ``scst``, ``eval``, ``caption``, ``qa``) to their keys. Every
command takes ``--set section.key=value`` overrides on top of the file. An unknown or
mistyped key is an error that names the key and the file, and every field's docstring
below is also its reference documentation (see ``vidcap config-reference``).

Each stage has a fingerprint: a hash of exactly the settings that change its outputs
(``STAGE_KEYS``). A finished stage records it in ``DONE.json``; the pipeline skips the
stage when it matches and refuses to overwrite it when it does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import ConfigError

# ---------------------------------------------------------------------------------------
# Sections. The first line of each field's docstring (the string below it) is its help.
# ---------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Folder of this run; every stage writes under `<output_dir>/<stage>/`."""
    seed: int = 0
    """Seed for sampling views, data order and initialisation."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    threads: int = 0
    """CPU threads for torch in this process (0: torch's default; 1 suits tiny models beside decode threads)."""
    stages: list[str] = field(default_factory=lambda: ["extract", "train", "scst", "eval"])
    """Stages `run_pipeline.py` runs, in this order."""
    prepare: str = ""
    """`demo`: before the first stage, build the synthetic world and tiny model the config names, if missing."""
    demo_videos: int = 600
    """Videos in the synthetic world that `prepare: demo` writes (60/20/20 train/val/test)."""
    demo_unlabelled: float = 0.0
    """Fraction of the demo world's training videos left unlabelled (split `unlabelled`, listed in `pool.jsonl`)."""
    sharding: str = "none"
    """Under torchrun: `none` (DDP: every process holds the whole model) or `fsdp` (weights, gradients, optimizer state sharded: `llm: full` of a 7B LM)."""

    def __post_init__(self) -> None:
        _check_choice("run.prepare", self.prepare, ("", "demo"))
        _check_choice("run.sharding", self.sharding, ("none", "fsdp"))
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"run.device must be auto, cpu, cuda or cuda:N (N a GPU index); got {self.device!r}"
            )
        _check_at_least("run.threads", self.threads, 0)
        _check_positive("run.demo_videos", self.demo_videos)
        if not self.output_dir:
            raise ConfigError("run.output_dir must not be empty")
        for stage in self.stages:
            if stage not in STAGES + STAGE_INSTANCES:
                choices = ", ".join(STAGES + STAGE_INSTANCES)
                raise ConfigError(f"run.stages: unknown stage {stage!r}; choose from {choices}")


@dataclass
class CaptionFilterConfig:
    """Which pseudo-labels of a `captions_jsonl` training set to keep (`pipeline.annotations`)."""

    score: str = "confidence"
    """Record field to rank by: `confidence` (geometric-mean token probability) or `beam_agreement`."""
    min_confidence: float = 0.0
    """Keep captions whose score is at least this (0: no threshold)."""
    top_fraction: float = 1.0
    """Then keep this fraction of the highest-scoring captions (1: all)."""

    def __post_init__(self) -> None:
        _check_choice("filter.score", self.score, ("confidence", "beam_agreement"))
        if not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(f"filter.top_fraction must be in (0, 1], got {self.top_fraction}")


@dataclass
class TrainSetConfig:
    """One training set of a mixture (`data.train_sets`; `pipeline/mixture.py`)."""

    name: str = ""
    """Short name; training examples are routed to this set's cache by it."""
    ratio: float = 1.0
    """Sampling weight: each global batch comes from one set, drawn with probability ratio / sum."""
    annotations: str = ""
    """Annotation file or folder (empty: the `data` section's own training split and cache)."""
    format: str = "jsonl"
    """Annotation format: as `data.format`, or `captions_jsonl` (what `vidcap caption` writes)."""
    video_root: str = ""
    """Folder that relative video paths are resolved against."""
    video_ext: str = ".mp4"
    """Extension appended to bare video ids."""
    split: str = "train"
    """Split of the annotations to train on (`captions_jsonl` records are all `train`)."""
    cache: str = ""
    """Zarr store of this set (empty: `<run.output_dir>/extract_sets/<name>/features.zarr`)."""
    pool: list[str] = field(default_factory=list)
    """Unlabelled videos the `pseudo_caption` stage captions into this set's annotations."""
    filter: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)
    """Which pseudo-labels to keep (`captions_jsonl` only)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"train set name must be non-empty and without '/', got {self.name!r}")
        if not self.ratio > 0:
            raise ConfigError(f"train set {self.name!r}: ratio must be > 0, got {self.ratio}")
        _check_choice(f"train set {self.name!r} format", self.format, DATA_FORMATS)
        if self.pool and (self.format != "captions_jsonl" or not self.annotations):
            raise ConfigError(
                f"train set {self.name!r}: a pool is captioned into `annotations` (set it) "
                "in format captions_jsonl"
            )


DATA_FORMATS = ("jsonl", "lavis", "msrvtt", "msvd", "vatex", "captions_jsonl")


@dataclass
class DataConfig:
    format: str = "jsonl"
    """Annotation format: `jsonl`, `lavis`, `msrvtt`, `msvd`, `vatex` or `captions_jsonl` (`vidcap caption`'s output)."""
    annotations: str | list[str] = ""
    """Annotation file (jsonl, msrvtt, vatex) or folder (lavis, msvd: `cap_{train,val,test}.json`; msrvtt, vatex: their files); msrvtt, vatex: also a list of files."""
    annotations_split: str = ""
    """Split of a single vatex annotation file whose name does not say it (`train`, `val`, `test`); empty: from the name."""
    video_root: str = ""
    """Folder that relative video paths are resolved against."""
    video_ext: str = ".mp4"
    """Extension appended to bare video ids (msrvtt `video7` -> `video7.mp4`, vatex, msvd)."""
    train_split: str = "train"
    """Name of the training split."""
    val_split: str = "val"
    """Name of the validation split (used for per-epoch validation CIDEr)."""
    test_split: str = "test"
    """Name of the split `eval` scores."""
    max_videos: int = 0
    """Keep only the first N videos of each split (0: all); for smoke tests."""
    train_sets: list[TrainSetConfig] = field(default_factory=list)
    """Train on a mixture: sets `{name, ratio, annotations, format, cache, pool, filter}` (README, Pseudo-labelling)."""
    task: str = "caption"
    """`caption`, or `qa`: answer questions about the videos (settings in the `qa` section)."""

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, DATA_FORMATS)
        _check_choice("data.task", self.task, ("caption", "qa"))
        if isinstance(self.annotations, list):
            if not all(isinstance(p, str) and p for p in self.annotations):
                raise ConfigError(
                    f"data.annotations must be a path or a list of paths, got {self.annotations!r}"
                )
            if len(self.annotations) == 1:
                self.annotations = self.annotations[0]
        elif not isinstance(self.annotations, str):
            raise ConfigError(f"data.annotations must be a path or a list of paths, got {self.annotations!r}")
        names = [s.name for s in self.train_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.train_sets: names must be unique, got {names}")
        if sum(1 for s in self.train_sets if s.pool) > 1:
            raise ConfigError("data.train_sets: at most one set may have a pool to pseudo-label")
        _check_at_least("data.max_videos", self.max_videos, 0)


@dataclass
class DecodeConfig:
    backend: str = "pyav"
    """Video decoder: `pyav` (exact on every file) or `decord` (where verified exact, else pyav, counted in `decode_fallbacks`)."""
    threads: int = 0
    """Decoder threads per video (0: the backend's automatic choice)."""

    def __post_init__(self) -> None:
        _check_choice("decode.backend", self.backend, ("pyav", "decord"))
        _check_at_least("decode.threads", self.threads, 0)


@dataclass
class ModelConfig:
    pretrained: str = "Salesforce/blip2-flan-t5-xl"
    """BLIP-2 to start from: a Hugging Face hub id or a local folder."""
    num_frames: int = 8
    """Frames sampled per video (T)."""
    image_size: int = 0
    """Side of the square frames fed to the ViT (0: the checkpoint's own, 224 for BLIP-2; larger interpolates positions)."""
    fusion: str = "concat"
    """How frame tokens reach the Q-Former: `concat` (T*L tokens) or `mean` (average over T)."""
    temporal_embeddings: bool = False
    """Add a learned, zero-initialised embedding per frame index before fusion."""
    llm: str = "frozen"
    """Language model training: `frozen`, `lora` or `full`."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    """Module names LoRA wraps (T5: `q`, `v`; OPT: `q_proj`, `v_proj`)."""
    prompt: str | None = None
    """Text prompt given to the language model (unset: the seed's, "a video of" for T5, "" for OPT and Vicuna)."""
    qformer_text_input: bool = False
    """InstructBLIP only: the Q-Former also reads the prompt's tokens (the seed: false)."""
    max_caption_tokens: int = 32
    """Caption length limit in tokens for training targets."""
    dtype: str = "auto"
    """Compute dtype: `auto` (bf16 autocast on CUDA, fp32 on CPU), `float32` or `bfloat16`."""
    vit: str = "frozen"
    """ViT training: `frozen` (what the feature cache stores) or `full` (paper Fig. 2a; needs `train.source: video`)."""
    vit_lr_scale: float = 1.0
    """Learning-rate multiplier of the ViT when `vit: full`."""
    vit_grad_checkpointing: bool = True
    """Recompute the trained ViT's activations in the backward pass (LAVIS `use_grad_checkpoint`): far less memory."""

    def __post_init__(self) -> None:
        _check_choice("model.fusion", self.fusion, ("concat", "mean"))
        _check_choice("model.llm", self.llm, ("frozen", "lora", "full"))
        _check_choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _check_choice("model.vit", self.vit, ("frozen", "full"))
        _check_positive("model.num_frames", self.num_frames)
        if self.image_size < 0:
            raise ConfigError(
                f"model.image_size must be positive (or 0: the checkpoint's own), got {self.image_size}"
            )
        _check_positive("model.max_caption_tokens", self.max_caption_tokens)
        _check_positive("model.lora_r", self.lora_r)
        _check_positive("model.lora_alpha", self.lora_alpha)
        _check_range("model.lora_dropout", self.lora_dropout, 0.0, 1.0, high_inclusive=False)
        if self.llm == "lora" and not self.lora_target_modules:
            raise ConfigError("model.lora_target_modules must name at least one module when model.llm=lora")
        if not self.pretrained:
            raise ConfigError("model.pretrained must name a hub id or a local folder; it is empty")


@dataclass
class CacheConfig:
    path: str = ""
    """Zarr store of ViT tokens (empty: `<run.output_dir>/extract/features.zarr`)."""
    train_views: int = 0
    """Augmented training views stored per video besides the evaluation view 0."""
    codec: str = "blosc-zstd"
    """Chunk compressor: `blosc-zstd` (byte shuffle + zstd: ~14% smaller than raw fp16), `zstd`, `lz4`, `blosc-lz4`, `none`."""
    codec_level: int = 3
    """Compression level of the codec."""

    def __post_init__(self) -> None:
        _check_choice("cache.codec", self.codec, ("zstd", "lz4", "blosc-zstd", "blosc-lz4", "none"))
        _check_at_least("cache.train_views", self.train_views, 0)
        low, high = CODEC_LEVELS[self.codec]
        _check_range(f"cache.codec_level (codec {self.codec})", self.codec_level, low, high)


@dataclass
class ExtractConfig:
    batch_size: int = 16
    """Videos per ViT batch (each contributes T * views frames)."""
    decode_workers: int = 2
    """Threads decoding videos ahead of the ViT."""
    workers: int = 0
    """Local Dask workers (0: run in this process)."""
    scheduler: str = ""
    """Address of a running Dask scheduler (`tcp://host:8786`); overrides `workers`."""
    splits: list[str] = field(default_factory=list)
    """Splits to extract (empty: every split in the annotations)."""

    def __post_init__(self) -> None:
        _check_positive("extract.batch_size", self.batch_size)
        _check_at_least("extract.decode_workers", self.decode_workers, 0)
        _check_at_least("extract.workers", self.workers, 0)


@dataclass
class OptimArgs:
    """How long and how a training stage optimises: one schema for `train` (CE) and `scst`.

    The data plan of an epoch is every training video once (`captions: sample`) or every
    (video, caption) pair (`all`); `max_steps` turns the epochs into an iteration budget.
    """

    SECTION: ClassVar[str] = "train"

    epochs: int = 5
    """Passes over the training data, when `max_steps` is 0."""
    max_steps: int = 0
    """Optimiser steps in all (an iteration budget; the schedule follows it); 0: `epochs` decide."""
    val_every: int = 0
    """Validate and keep the best every N optimiser steps (an "inner epoch"); 0: after each epoch."""
    captions: str = "sample"
    """`sample`: one random reference per video per epoch; `all`: every (video, caption) pair."""
    batch_size: int = 8
    """Global batch per optimiser step: examples over all processes and accumulated micro-batches."""
    gpu_batch: int = 0
    """Examples per process per micro-step; accumulation = batch_size / (processes x gpu_batch). 0: use grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step, when `gpu_batch` is 0."""
    lr: float = 5e-5
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_lr: float = 1e-8
    """Learning rate at step 0 of the warmup."""
    warmup_steps: int = 1000
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay, on every trainable parameter of 2 or more dimensions except `no_decay`."""
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "embed", "query_tokens"])
    """Parameter-name fragments exempt from weight decay (LAVIS: `[bias, norm]`)."""
    grad_clip: float = 1.0
    """Max gradient norm (0: off)."""
    checkpoint_every: int = 200
    """Save a resumable checkpoint every N optimiser steps (and at each validation)."""
    log_every: int = 10
    """Log training metrics every N optimiser steps."""
    select: str = "cider"
    """Best checkpoint by `cider` (greedy CIDEr-D on val; cheap) or `beam_cider_bleu4` (eval's beams, CIDEr-D + BLEU-4: LAVIS)."""

    def key(self, name: str) -> str:
        """The dotted config key of field `name`, for messages."""
        return f"{self.SECTION}.{name}"

    def __post_init__(self) -> None:
        _check_choice(self.key("captions"), self.captions, ("sample", "all"))
        _check_choice(self.key("select"), self.select, ("cider", "beam_cider_bleu4"))
        _check_positive(self.key("batch_size"), self.batch_size)
        _check_positive(self.key("grad_accum"), self.grad_accum)
        for name in ("epochs", "max_steps", "val_every", "gpu_batch", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{self.key(name)} must be >= 0, got {getattr(self, name)}")
        if self.gpu_batch and self.grad_accum != 1:
            raise ConfigError(
                f"set {self.key('gpu_batch')} or {self.key('grad_accum')}, not both: "
                "the accumulation follows from the global batch, the per-process batch and the processes"
            )
        if self.gpu_batch and self.batch_size % self.gpu_batch:
            raise ConfigError(
                f"{self.key('batch_size')} ({self.batch_size}) must be a multiple of "
                f"{self.key('gpu_batch')} ({self.gpu_batch})"
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"{self.key('batch_size')} ({self.batch_size}) must be divisible by "
                f"{self.key('grad_accum')} ({self.grad_accum})"
            )
        if self.max_steps == 0:
            _check_positive(f"{self.key('epochs')} (with {self.key('max_steps')} 0)", self.epochs)
        _check_learning_rates(self.SECTION, self.lr, self.min_lr)
        _check_at_least(self.key("warmup_lr"), self.warmup_lr, 0.0)
        _check_at_least(self.key("weight_decay"), self.weight_decay, 0.0)
        _check_at_least(self.key("grad_clip"), self.grad_clip, 0.0)
        _check_positive(self.key("checkpoint_every"), self.checkpoint_every)
        _check_positive(self.key("log_every"), self.log_every)

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(examples per process per micro-step, micro-steps per optimiser step) on `world_size` processes.

        An error naming the keys when the global batch does not split evenly.
        """
        if self.gpu_batch:
            per_step = world_size * self.gpu_batch
            if self.batch_size % per_step:
                raise ConfigError(
                    f"{self.key('batch_size')} ({self.batch_size}) must be {self.key('gpu_batch')} "
                    f"({self.gpu_batch}) x processes ({world_size}) x an accumulation: "
                    f"{self.batch_size} / {per_step} is not whole; change one of them"
                )
            return self.gpu_batch, self.batch_size // per_step
        parts = world_size * self.grad_accum
        if self.batch_size % parts:
            raise ConfigError(
                f"{self.key('batch_size')} ({self.batch_size}) must be divisible by the number of processes "
                f"WORLD_SIZE ({world_size}) x {self.key('grad_accum')} ({self.grad_accum})"
            )
        return self.batch_size // parts, self.grad_accum


@dataclass
class TrainConfig(OptimArgs):
    source: str = "cache"
    """Where frame tokens come from: `cache` (the Zarr store) or `video` (decode + ViT per step)."""
    temporal_lr_scale: float = 1.0
    """Learning-rate multiplier of the temporal embeddings (new, zero-initialised; SCST uses it too)."""
    val_max_videos: int = 0
    """Validate on at most N videos of the validation split (0: all)."""
    num_workers: int = 2
    """Data loader workers reading the cache (0: main process)."""
    allow_no_validation: bool = False
    """Train although no validation video is available (then `best/` is simply the last epoch's model)."""
    allow_partial_cache: bool = False
    """Train although videos of the train or validation split are still pending in the cache (not yet extracted)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("train.source", self.source, ("cache", "video"))
        _check_at_least("train.temporal_lr_scale", self.temporal_lr_scale, 0.0)
        _check_at_least("train.val_max_videos", self.val_max_videos, 0)
        _check_at_least("train.num_workers", self.num_workers, 0)


@dataclass
class ScstConfig(OptimArgs):
    SECTION: ClassVar[str] = "scst"

    # SCST's own defaults for the shared fields (their help is `OptimArgs`'s)
    epochs: int = 1
    max_steps: int = 20000
    batch_size: int = 16
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0

    samples: int = 5
    """Sampled captions per video (k)."""
    baseline: str = "greedy"
    """Reward baseline: `greedy` (reward of the greedy caption) or `mean` (of the other k-1 samples)."""
    temperature: float = 1.0
    """Sampling temperature; the policy gradient scores the samples at the same temperature."""
    top_k: int = 0
    """Top-k sampling (0: off); the gradient uses the untruncated distribution (an approximation)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off); like top_k, not applied to the gradient."""
    max_new_tokens: int = 32
    """Length limit of sampled captions (at least `eval.min_new_tokens`, as in evaluation)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("scst.baseline", self.baseline, ("greedy", "mean"))
        _check_positive("scst.samples", self.samples)
        if self.samples < 2 and self.baseline == "mean":
            raise ConfigError("scst.baseline=mean needs scst.samples >= 2")
        _check_range("scst.temperature", self.temperature, 0.0, None, low_inclusive=False)
        _check_at_least("scst.top_k", self.top_k, 0)
        _check_range("scst.top_p", self.top_p, 0.0, 1.0, low_inclusive=False)
        _check_positive("scst.max_new_tokens", self.max_new_tokens)


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["zero_shot", "ce", "scst"])
    """Models to evaluate: `zero_shot` (model.pretrained), `ce` (best train checkpoint), `scst`, or a folder."""
    split: str = ""
    """Split to score (empty: data.test_split)."""
    source: str = "auto"
    """Frame tokens from `cache`, from `video`, or `auto` (cache when it covers the split)."""
    batch_size: int = 16
    """Videos per generation batch."""
    num_beams: int = 5
    """Beam width."""
    max_new_tokens: int = 32
    """Maximum caption length in tokens."""
    min_new_tokens: int | None = None
    """Minimum caption length in new tokens (unset: the seed's min_length=5 as LAVIS counts it: T5 4, OPT/Vicuna 5)."""
    metrics: list[str] = field(default_factory=lambda: ["Bleu", "METEOR", "ROUGE_L", "CIDEr"])
    """coco-caption metrics to compute (`SPICE` too where it can run)."""

    def __post_init__(self) -> None:
        _check_choice("eval.source", self.source, ("auto", "cache", "video"))
        if not self.models:
            raise ConfigError("eval.models is empty; name at least one of zero_shot, ce, scst or a folder")
        _check_positive("eval.batch_size", self.batch_size)
        _check_decoding("eval", self.num_beams, self.min_new_tokens, self.max_new_tokens)
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown or not self.metrics:
            raise ConfigError(
                f"eval.metrics: unknown metric {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"choose from {', '.join(METRIC_NAMES)}"
            )


@dataclass
class CaptionConfig:
    batch_size: int = 8
    """Videos per generation batch."""
    decode_workers: int = 2
    """Threads decoding videos ahead of the model."""
    num_beams: int = 5
    """Beam width (1: greedy)."""
    max_new_tokens: int = 32
    """Maximum caption length in tokens."""
    min_new_tokens: int | None = None
    """Minimum caption length in new tokens (unset: the flavour's seed rule, as `eval.min_new_tokens`)."""
    workers: int = 0
    """Local Dask workers (0: in this process)."""
    scheduler: str = ""
    """Address of a running Dask scheduler; overrides `workers`."""
    window: float = 0.0
    """Caption consecutive windows of this many seconds (0: whole video)."""
    inputs: list[str] = field(default_factory=list)
    """What the `caption` stage of a pipeline captions: files, folders, globs or manifests."""
    model: str = ""
    """Model of the `caption` stage (empty: the run's best SCST model, else its best CE model)."""
    out: str = ""
    """JSONL the `caption` stage writes (empty: `<run.output_dir>/caption/captions.jsonl`)."""

    def __post_init__(self) -> None:
        _check_positive("caption.batch_size", self.batch_size)
        _check_at_least("caption.decode_workers", self.decode_workers, 0)
        _check_decoding("caption", self.num_beams, self.min_new_tokens, self.max_new_tokens)
        _check_at_least("caption.workers", self.workers, 0)
        if not (math.isfinite(self.window) and self.window >= 0):
            raise ConfigError(f"caption.window must be >= 0 seconds (0: whole video), got {self.window}")


@dataclass
class QaConfig:
    """Video question answering (`data.task: qa`); the generation settings are BLIP-2's `predict_answers`."""

    prompt: str = "Question: {} Short answer:"
    """Language-model prompt per question; `{}` is replaced by the question (BLIP-2's VQA prompt)."""
    num_beams: int = 5
    """Beam width of answer generation."""
    max_new_tokens: int = 10
    """Maximum answer length in tokens."""
    min_new_tokens: int = 1
    """Minimum answer length in tokens (BLIP-2's `min_len=1` counts T5's start token and allows an empty answer)."""
    length_penalty: float = -1.0
    """Beam-search length penalty (-1: prefer short answers, as BLIP-2 Flan-T5's `predict_answers`)."""
    dataset: str = ""
    """Published numbers printed beside ours: `msrvtt`, `msvd` (MSRVTT-QA, MSVD-QA), or empty (from data.format)."""

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise ConfigError(f"qa.prompt must contain {{}} where the question goes; got {self.prompt!r}")
        _check_choice("qa.dataset", self.dataset, ("", "msrvtt", "msvd"))
        _check_positive("qa.num_beams", self.num_beams)
        _check_positive("qa.max_new_tokens", self.max_new_tokens)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    qa: QaConfig = field(default_factory=QaConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)
    stage_folders: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Folder names of stages run as a named instance (`train` -> `train_labelled`); not a YAML key."""

    def __post_init__(self) -> None:
        # The feature cache holds a frozen ViT's tokens: a trained ViT must see the frames.
        if self.model.vit != "frozen":
            for key, value in (("train.source", self.train.source), ("eval.source", self.eval.source)):
                if value == "cache":
                    raise ConfigError(
                        f"model.vit: {self.model.vit} trains the ViT, but {key}: cache reads the tokens of the "
                        f"frozen ViT from the feature cache; set {key}: video"
                    )
        if self.eval.min_new_tokens is not None and self.scst.max_new_tokens < self.eval.min_new_tokens:
            raise ConfigError(
                f"scst.max_new_tokens ({self.scst.max_new_tokens}) must be at least "
                f"eval.min_new_tokens ({self.eval.min_new_tokens})"
            )

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache.path) if self.cache.path else self.output_dir / "extract" / "features.zarr"

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / self.stage_folders.get(stage, stage)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _sections()}

    def with_absolute_paths(self) -> Config:
        """This config with every file path absolute against the current directory, and a local
        model folder absolute (a hub id stays as written).

        What stages send to Dask workers: a worker started in another directory would resolve a
        relative path against its own, and take a relative model folder for a hub id.
        """
        replace = dataclasses.replace
        data = self.data
        return replace(
            self,
            run=replace(self.run, output_dir=absolute_path(self.run.output_dir)),
            data=replace(
                data, annotations=absolute_paths(data.annotations), video_root=absolute_path(data.video_root)
            ),
            model=replace(self.model, pretrained=model_location(self.model.pretrained)),
            cache=replace(self.cache, path=absolute_path(self.cache.path)),
            caption=replace(
                self.caption,
                inputs=[absolute_path(i) for i in self.caption.inputs],
                model=model_location(self.caption.model),
                out=absolute_path(self.caption.out),
            ),
        )


def absolute_path(path: str) -> str:
    """`path` made absolute against the current directory (`~` expanded); "" stays ""."""
    return str(Path(path).expanduser().absolute()) if path else path


def absolute_paths(paths: str | list[str]) -> str | list[str]:
    """`absolute_path` of one path or of each of a list."""
    return [absolute_path(p) for p in paths] if isinstance(paths, list) else absolute_path(paths)


def model_location(name: str) -> str:
    """A model folder that exists here, as an absolute path; anything else (a hub id, "") as given."""
    return absolute_path(name) if name and Path(name).expanduser().exists() else name


STAGES = ("extract", "train", "scst", "eval", "caption")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# coco-caption metric names (pipeline/metrics.py computes them; a test keeps the two in step).
METRIC_NAMES = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# Valid levels per codec: blosc's clevel 0-9, zstd's 1-22 (0: its default); lz4 ignores it.
CODEC_LEVELS: dict[str, tuple[int | None, int | None]] = {
    "zstd": (0, 22),
    "blosc-zstd": (0, 9),
    "blosc-lz4": (0, 9),
    "lz4": (None, None),
    "none": (None, None),
}
# Named instances of those stages on a derived config, for the pseudo-labelling loop
# (`run_pipeline.py`, `pipeline/mixture.py`): each writes its own folder and DONE.json.
STAGE_INSTANCES = ("train_labelled", "pseudo_caption", "extract_sets")

# Settings that change each stage's outputs. A stage's fingerprint also folds in the
# fingerprints of the stages it reads from, so retraining invalidates evaluation.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "extract": (
        "data.format",
        "data.annotations",
        "data.annotations_split",
        "data.video_root",
        "data.video_ext",
        "data.max_videos",
        "decode.backend",
        "model.pretrained",
        "model.num_frames",
        "model.image_size",
        "cache.path",
        "cache.train_views",
        "cache.codec",
        "cache.codec_level",
        "extract.splits",
        "run.seed",
    ),
    "train": (
        "data",
        "model",
        "cache.path",
        "cache.train_views",
        "train.source",
        "train.epochs",
        "train.max_steps",
        "train.val_every",
        "train.batch_size",
        "train.gpu_batch",
        "train.grad_accum",
        "train.lr",
        "train.min_lr",
        "train.warmup_lr",
        "train.warmup_steps",
        "train.weight_decay",
        "train.no_decay",
        "train.temporal_lr_scale",
        "train.grad_clip",
        "train.captions",
        "train.val_max_videos",
        "train.select",
        "eval.num_beams",  # validation with `train.select: beam_cider_bleu4` uses eval's beams
        "eval.max_new_tokens",  # validation captions use eval's length limits
        "eval.min_new_tokens",
        "run.seed",
        "qa",
    ),
    "scst": ("scst", "eval.num_beams", "eval.max_new_tokens", "eval.min_new_tokens", "run.seed", "qa"),
    "eval": (
        "data.task",
        "qa",
        "eval.models",
        "eval.split",
        "eval.num_beams",
        "eval.max_new_tokens",
        "eval.min_new_tokens",
        "eval.metrics",
        "data.test_split",
    ),
    "caption": ("caption",),
}
QA_KEYS = ("data.task", "qa.")
"""Keys a caption run leaves out of its fingerprints, so they read as before QA existed."""
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "extract": (),
    "train": ("extract",),
    "scst": ("train",),
    "eval": ("train", "scst"),
    "caption": ("train", "scst"),
}


# The stages that read the annotations; the formats whose annotations are a folder, or a file.
READS_ANNOTATIONS = ("extract", "train", "scst", "eval")
FOLDER_FORMATS = ("lavis", "msvd")
FILE_FORMATS = ("jsonl", "captions_jsonl")


def check_stage_inputs(config: Config, stage: str) -> None:
    """Refuse a config whose input paths that `stage` reads do not exist (or are the wrong kind).

    Run when a stage starts, before it touches anything: the schema alone cannot know which
    paths a command needs (`vidcap caption` reads no annotations; `prepare: demo` writes them).
    """
    data = config.data
    given = [data.annotations] if isinstance(data.annotations, str) else list(data.annotations)
    for name in given if stage in READS_ANNOTATIONS else []:
        path = Path(name).expanduser()
        if not name:
            continue
        if not path.exists():
            raise ConfigError(f"{config.source}: data.annotations: no such file or folder {path}")
        if (data.format in FOLDER_FORMATS and not path.is_dir()) or (
            data.format in FILE_FORMATS and path.is_dir()
        ):
            kind = "a folder" if path.is_dir() else "a file"
            need = "a folder of cap_{train,val,test}.json" if data.format in FOLDER_FORMATS else "a file"
            raise ConfigError(
                f"{config.source}: data.annotations={path} is {kind}; data.format={data.format} needs {need}"
            )
    if stage == "extract" and data.video_root and not Path(data.video_root).is_dir():
        raise ConfigError(f"{config.source}: data.video_root: no such folder {data.video_root}")
    models = [("model.pretrained", config.model.pretrained)]
    if stage == "caption" and config.caption.model:
        models.append(("caption.model", config.caption.model))
    for key, value in models:
        if looks_like_local_path(value) and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{config.source}: {key}: no such model folder {value}")


def looks_like_local_path(name: str) -> bool:
    """True when `name` cannot be a Hugging Face hub id (`org/name`), so it must be a local folder."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or name.endswith("/")
        or "\\" in name
    )


def _yaml() -> Any:
    import yaml  # deferred: compiling its regexes is a third of `vidcap --help`'s start-up

    return yaml


def _sections() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(Config) if f.name not in ("source", "stage_folders"))


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config and apply `section.key=value` overrides; validate everything."""
    raw: dict[str, Any] = {}
    source = "--set" if overrides else "<defaults>"  # what the errors name when there is no file
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            raw = _yaml().safe_load(text) or {}
        except _yaml().YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        _apply_override(raw, override)
    config = config_from_dict(raw, source)
    config.source = source
    return config


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    sections = {f.name: f for f in _sections()}
    built: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r}; sections are {', '.join(sections)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(values).__name__}")
        built[name] = _build_section(sections[name].default_factory, name, values, source)
    try:
        return Config(**built)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _build_section(cls: type, section: str, values: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            hint = _closest(key, fields)
            raise ConfigError(
                f"{source}: unknown key {section}.{key}"
                + (f" (did you mean {section}.{hint}?)" if hint else "")
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if dataclasses.is_dataclass(item) and isinstance(value, list):
            return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item, key, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if dataclasses.is_dataclass(hint):  # a nested mapping: data.train_sets[i], its filter
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return _build_section(hint, key, value, source)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        try:
            number = float(value) if hint is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, value = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {override!r}: the key must be section.key, e.g. train.lr=1e-4")
    section, key = parts
    parsed = _yaml().safe_load(value) if value.strip() else ""
    current = raw.setdefault(section, {})
    if current is None:
        current = raw[section] = {}
    if not isinstance(current, dict):
        raise ConfigError(f"--set {override!r}: section {section!r} is not a mapping")
    current[key] = parsed


def _closest(key: str, names: dict[str, Any]) -> str | None:

    match = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return match[0] if match else None


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _check_at_least(key: str, value: float, minimum: float) -> None:
    if not value >= minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _check_range(
    key: str,
    value: float,
    low: float | None,
    high: float | None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """`value` within [low, high] (open ends where not inclusive; None: unbounded)."""
    below = low is not None and (value < low if low_inclusive else value <= low)
    above = high is not None and (value > high if high_inclusive else value >= high)
    if below or above or value != value:  # NaN is never in range
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        span = f"{'[' if low_inclusive else '('}{left}, {right}{']' if high_inclusive else ')'}"
        raise ConfigError(f"{key} must be in {span}, got {value}")


def _check_learning_rates(section: str, lr: float, min_lr: float) -> None:
    _check_positive(f"{section}.lr", lr)
    _check_at_least(f"{section}.min_lr", min_lr, 0.0)
    if min_lr > lr:
        raise ConfigError(f"{section}.min_lr ({min_lr}) must not exceed {section}.lr ({lr})")


def _check_decoding(section: str, num_beams: int, min_new_tokens: int | None, max_new_tokens: int) -> None:
    _check_positive(f"{section}.num_beams", num_beams)
    _check_positive(f"{section}.max_new_tokens", max_new_tokens)
    if min_new_tokens is None:  # unset: the model flavour's rule decides
        return
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int):
        raise ConfigError(f"{section}.min_new_tokens must be an integer (or unset), got {min_new_tokens!r}")
    _check_at_least(f"{section}.min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise ConfigError(
            f"{section}.min_new_tokens ({min_new_tokens}) must not exceed {section}.max_new_tokens ({max_new_tokens})"
        )


# ---------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------


def stage_settings(config: Config, stage: str) -> dict[str, Any]:
    """The settings that determine `stage`'s outputs, as a flat {dotted key: value} dict."""
    flat = config.to_dict()
    settings: dict[str, Any] = {}
    for key in STAGE_KEYS[stage]:
        section, _, name = key.partition(".")
        if name:
            settings[key] = flat[section][name]
        else:
            settings.update({f"{section}.{k}": v for k, v in flat[section].items()})
    if config.data.task == "caption":
        settings = {k: v for k, v in settings.items() if not k.startswith(QA_KEYS)}
    for upstream in STAGE_INPUTS[stage]:
        settings[f"<{upstream}>"] = stage_fingerprint(config, upstream)
    return settings


def stage_fingerprint(config: Config, stage: str) -> str:
    """A stable hash of `stage_settings(config, stage)`."""
    blob = json.dumps(stage_settings(config, stage), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two settings dicts: `key: old -> new`."""
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


def config_reference() -> str:
    """Markdown table of every key, its default and its help: the README's reference section."""

    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in _sections():
        cls = section.default_factory
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"| `{section.name}.{f.name}` | `{json.dumps(default)}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    import ast  # deferred with inspect: only `config-reference` reads the schema's source
    import inspect

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a base's help first
        body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        for node, following in zip(body, body[1:], strict=False):
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and is_doc and isinstance(following.value.value, str):
                docs[node.target.id] = following.value.value.strip().splitlines()[0]
    return docs
