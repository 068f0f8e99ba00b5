"""The effective recipe of each training stage of a config, computed before anything runs (`vidcap plan`).

For `train` (CE) and `scst`: examples per epoch, steps, the global batch as processes x per-process
batch x accumulation, the warm-up's share and the learning rate along the budget, frames and views,
the precision of each module, trainable parameters per module, and the generation settings.

Examples per epoch come from the annotations when they can be read; otherwise from the published
size of the dataset's training split (the presets point at data that is not here yet). Trainable
parameters come from the model's `config.json` (a local folder, or the Hugging Face cache) on
PyTorch's meta device, so no weight is loaded; without it they are "unknown".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, OptimArgs
from pipeline.errors import AnnotationError
from pipeline.flavours import FLAVOURS, flavour_of
from pipeline.schedule import WarmupCosine

# Training split of each dataset format as published: (videos, (video, caption) pairs).
# MSVD's captions vary per video (about 41): its pair count is an estimate.
PUBLISHED_TRAIN_SIZES: dict[str, tuple[int, int, str]] = {
    "msrvtt": (6513, 130_260, "MSR-VTT train: 6,513 videos x 20 captions"),
    "msvd": (1200, 49_200, "MSVD train: 1,200 videos x about 41 captions (estimate)"),
    "vatex": (25_991, 259_910, "VATEX train: 25,991 videos x 10 English captions"),
}
LR_POINTS = (0.0, 0.1, 0.5, 1.0)
"""Fractions of the budget at which the plan shows the learning rate."""


@dataclass
class StagePlan:
    """The recipe of one training stage, as `vidcap plan` prints it."""

    stage: str
    gpus: int
    videos: int | None
    examples_per_epoch: int | None
    examples_from: str
    captions: str
    steps_per_epoch: int | None
    total_steps: int | None
    epochs: float | None
    val_every: int | None
    global_batch: int
    gpu_batch: int | None
    accumulation: int | None
    batch_error: str
    warmup_steps: int
    warmup_share: float | None
    lr: dict[str, float]
    weight_decay: float
    no_decay: list[str]
    grad_clip: float
    frames: int
    image_size: int
    views: str
    precision: dict[str, str]
    trainable: dict[str, int] | str
    prompt: str | None  # None: the flavour's seed prompt, unknown without the model's config.json
    generation: dict[str, Any] = field(default_factory=dict)
    mixture: str = ""
    """`data.train_sets` of a CE stage: each set's share of the batches (`pipeline/mixture.py`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_config(config: Config, gpus: int = 8) -> list[StagePlan]:
    """The plan of each training stage (`train`, `scst`) that `config.run.stages` runs."""
    if gpus <= 0:
        raise ConfigError(f"--gpus must be positive, got {gpus}")
    counts = _train_counts(config)
    trainable = trainable_parameters(config)
    return [
        _stage_plan(config, stage, gpus, counts, trainable)
        for stage in ("train", "scst")
        if stage in config.run.stages
    ]


def _stage_plan(
    config: Config, stage: str, gpus: int, counts: dict[str, Any], trainable: dict[str, int] | str
) -> StagePlan:
    args: OptimArgs = getattr(config, stage)
    videos, pairs, source = counts["videos"], counts["pairs"], counts["from"]
    examples = None if videos is None else (pairs if args.captions == "all" else videos)
    steps_per_epoch = -(-examples // args.batch_size) if examples else None
    mixture = _mixture(config) if stage == "train" and config.data.train_sets else ""
    if mixture and steps_per_epoch and not config.data.train_sets[0].annotations:
        share = config.data.train_sets[0].ratio / sum(s.ratio for s in config.data.train_sets)
        steps_per_epoch = math.ceil(steps_per_epoch / share)  # as `MixturePlan`
    total = args.max_steps or (steps_per_epoch * args.epochs if steps_per_epoch else None)
    try:
        gpu_batch, accumulation, batch_error = *args.accumulation(gpus), ""
    except ConfigError as e:
        gpu_batch, accumulation, batch_error = None, None, str(e)
    lr = {}
    if total:
        schedule = WarmupCosine(args.lr, args.min_lr, args.warmup_lr, args.warmup_steps, total)
        lr = {f"{round(100 * p)}%": schedule.lr_at(round(p * total)) for p in LR_POINTS}
    return StagePlan(
        stage=stage,
        gpus=gpus,
        videos=videos,
        examples_per_epoch=examples,
        examples_from=source,
        captions=args.captions,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=round(total / steps_per_epoch, 2) if total and steps_per_epoch else None,
        val_every=args.val_every or steps_per_epoch,
        global_batch=args.batch_size,
        gpu_batch=gpu_batch,
        accumulation=accumulation,
        batch_error=batch_error,
        warmup_steps=args.warmup_steps,
        warmup_share=round(args.warmup_steps / total, 4) if total else None,
        lr=lr,
        weight_decay=args.weight_decay,
        no_decay=list(args.no_decay),
        grad_clip=args.grad_clip,
        frames=config.model.num_frames,
        image_size=config.model.image_size,
        views=_views(config),
        precision=precision(config),
        trainable=trainable,
        prompt=_prompt(config),
        generation=_generation(config, stage),
        mixture=mixture,
    )


def _prompt(config: Config) -> str | None:
    """The language model's prompt: `qa.prompt` (one per question) for QA, else `model.prompt` or the seed's."""
    if config.data.task == "qa":
        return config.qa.prompt
    return _seed_default(config, "seed_prompt") if config.model.prompt is None else config.model.prompt


def _mixture(config: Config) -> str:
    """One global batch per step from one set, drawn with probability ratio / sum (as LAVIS)."""
    total = sum(s.ratio for s in config.data.train_sets)
    parts = []
    for s in config.data.train_sets:
        what = f"{s.format} {s.annotations}" if s.annotations else "the data section's training split"
        if s.format == "captions_jsonl" and (s.filter.min_confidence > 0 or s.filter.top_fraction < 1):
            what += f"; {s.filter.score} >= {s.filter.min_confidence}, top {100 * s.filter.top_fraction:g}%"
        parts.append(f"{s.name} {100 * s.ratio / total:.1f}% of the steps ({what})")
    return "; ".join(parts) + "; an epoch sees the first set once in expectation"


# Training split of each QA dataset as published: (videos, (video, question) pairs).
PUBLISHED_QA_TRAIN_SIZES: dict[str, tuple[int, int, str]] = {
    "msrvtt": (6513, 158_581, "MSRVTT-QA train: 158,581 questions about 6,513 videos"),
    "msvd": (1200, 30_933, "MSVD-QA train: 30,933 questions about 1,200 videos"),
}


def _train_counts(config: Config) -> dict[str, Any]:
    """Training videos and (video, caption) pairs: from the annotations, else the published sizes."""
    if config.data.task == "qa":
        return _qa_train_counts(config)
    try:
        from pipeline.annotations import load_manifest  # deferred: only when the annotations exist
        from pipeline.text import clean_caption

        records = load_manifest(config.data).split(config.data.train_split)
    except (AnnotationError, OSError) as e:
        known = PUBLISHED_TRAIN_SIZES.get(config.data.format)
        return _published_counts(known, config, f"annotations not readable ({e})")
    captions = [[c for c in map(clean_caption, r.captions) if c] for r in records]  # as TrainPlan counts
    captions = [c for c in captions if c]
    where = f"annotations {config.data.annotations}"
    return {"videos": len(captions), "pairs": sum(map(len, captions)), "from": where}


def _published_counts(known: tuple[int, int, str] | None, config: Config, unreadable: str) -> dict[str, Any]:
    """Training counts from the published split size when the annotations cannot be read here."""
    if known is None:
        return {"videos": None, "pairs": None, "from": f"unknown: {unreadable}"}
    videos, pairs, what = known
    if config.data.max_videos:
        videos, pairs = min(videos, config.data.max_videos), None
    return {"videos": videos, "pairs": pairs, "from": f"published size ({what}); annotations not found"}


def _qa_train_counts(config: Config) -> dict[str, Any]:
    """`data.task: qa`: training videos and (video, question) pairs, as `pipeline.qa.QaPlan` counts them."""
    try:
        from pipeline.qa import load_qa  # deferred (imports torch): only for QA configs

        items = load_qa(config.data).split(config.data.train_split)
    except (AnnotationError, OSError) as e:
        known = PUBLISHED_QA_TRAIN_SIZES.get(config.qa.dataset or config.data.format)
        return _published_counts(known, config, f"questions not readable ({e})")
    return {
        "videos": len({i.video_id for i in items}),
        "pairs": len(items),
        "from": f"questions in {config.data.annotations}",
    }


def _views(config: Config) -> str:
    stored = config.cache.train_views
    if stored == 0:
        return "view 0 only (no augmentation)"
    if config.train.source == "video":
        return "a fresh head-tail sample, crop and flip at every read (from video)"
    return f"{stored} augmented view(s) stored per video, cycled read after read"


def precision(config: Config) -> dict[str, str]:
    """Compute precision of each module on a GPU (`model.dtype`); CPU runs are fp32 throughout."""
    if config.model.dtype == "float32":
        return dict.fromkeys(("vit", "qformer", "llm"), "fp32")
    # pipeline.vision's rule: fp32 weights, LayerNorms and residual stream; matmuls in bf16 autocast
    vit = "fp32 weights, bf16 autocast"
    if config.model.vit == "full":
        vit += " (trained)"
    elif config.train.source != "video":
        vit += " at extract (training reads the fp16 cache)"
    llm = "fp32 weights, bf16 autocast" if config.model.llm == "full" else "bf16 (frozen)"
    if config.model.llm == "lora":
        llm = "bf16 (frozen), LoRA fp32 weights, bf16 autocast"
    return {"vit": vit, "qformer": "fp32 (no autocast), query tokens fp32", "llm": llm}


def _seed_default(config: Config, field_name: str) -> Any:
    """A `pipeline.flavours.Flavour` default (`seed_prompt`, `seed_min_new_tokens`) of the model's
    language model when its config.json is here; None when the flavour cannot be known offline."""
    config_file = _model_config_file(config.model.pretrained)
    if config_file is None:
        return None
    text_type = json.loads(config_file.read_text()).get("text_config", {}).get("model_type", "")
    return getattr(FLAVOURS[text_type], field_name) if text_type in FLAVOURS else None


def _min_new_tokens(config: Config) -> int | None:
    """`eval.min_new_tokens`, or when unset the flavour's seed rule (T5 4, OPT/Vicuna 5)."""
    if config.eval.min_new_tokens is not None:
        return config.eval.min_new_tokens
    return _seed_default(config, "seed_min_new_tokens")


def _generation(config: Config, stage: str) -> dict[str, Any]:
    lengths = {"max_new_tokens": config.eval.max_new_tokens, "min_new_tokens": _min_new_tokens(config)}
    select = getattr(config, stage).select
    beams = config.eval.num_beams if select == "beam_cider_bleu4" else 1
    if config.data.task == "qa":  # answers: `qa` lengths and beams; validation: greedy, best by accuracy
        q = config.qa
        lengths, select, beams = (
            {"max_new_tokens": q.max_new_tokens, "min_new_tokens": q.min_new_tokens},
            "accuracy",
            1,
        )
    generation: dict[str, Any] = {"validation": {"num_beams": beams, "select": select, **lengths}}
    generation["eval"] = {
        "num_beams": config.qa.num_beams if select == "accuracy" else config.eval.num_beams,
        **lengths,
    }
    if stage == "scst":
        s = config.scst
        generation["samples"] = {
            "k": s.samples,
            "baseline": s.baseline,
            "temperature": s.temperature,
            "max_new_tokens": lengths["max_new_tokens"] if select == "accuracy" else s.max_new_tokens,
            "min_new_tokens": lengths["min_new_tokens"],
        }
    return generation


def trainable_parameters(config: Config) -> dict[str, int] | str:
    """Trainable parameters per module for `model.llm`, from the model's config.json, no weights."""
    config_file = _model_config_file(config.model.pretrained)
    if config_file is None:
        return (
            f"unknown (no config.json of {config.model.pretrained} here: not a folder, not in the HF cache)"
        )
    import torch  # deferred: building the module tree needs torch and transformers

    from pipeline.vision import architecture

    arch = architecture(config_file.parent)  # BLIP-2 or InstructBLIP
    blip_config = arch.config.from_pretrained(str(config_file.parent))
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        blip = arch.model(blip_config)
    counts = {
        "qformer": _numel(blip.qformer),
        "query_tokens": blip.query_tokens.numel(),
        "language_projection": _numel(blip.language_projection),
    }
    if config.model.vit == "full":
        counts["vision_model"] = _numel(blip.vision_model)
    if config.model.temporal_embeddings:
        counts["temporal_embeddings"] = config.model.num_frames * blip_config.vision_config.hidden_size
    if config.model.llm == "full":
        counts["language_model"] = _numel(blip.language_model)
    elif config.model.llm == "lora":
        counts["language_model_lora"] = _lora_parameters(blip, config)
    counts["total"] = sum(counts.values())
    return counts


def _model_config_file(pretrained: str) -> Path | None:
    """The BLIP-2 `config.json` behind `model.pretrained`: a folder (an exported video model points at
    its base), or a hub id already in the Hugging Face cache; None when neither is here."""
    folder = Path(pretrained)
    if (folder / "video_model.json").is_file():
        folder = Path(json.loads((folder / "video_model.json").read_text()).get("pretrained", folder))
    if (folder / "config.json").is_file():
        return folder / "config.json"
    if folder.exists() or pretrained.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache  # deferred: only for a hub id

    cached = try_to_load_from_cache(pretrained, "config.json")
    return Path(cached) if isinstance(cached, str) else None


def _numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_parameters(blip: Any, config: Config) -> int:
    """r x (in + out) for each wrapped linear map (the names as `model.lora_target_modules`)."""
    aliases = flavour_of(blip.config.text_config.model_type).lora_names
    targets = {aliases.get(t, t) for t in config.model.lora_target_modules}
    linears = [
        m
        for name, m in blip.language_model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features")
    ]
    return sum(config.model.lora_r * (m.in_features + m.out_features) for m in linears)


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def format_plan(plans: list[StagePlan], source: str) -> str:
    """The plans as aligned text, one block per stage."""
    lines = []
    for p in plans:
        lines.append(
            f"{p.stage} ({'cross-entropy' if p.stage == 'train' else 'SCST'}) of {source} on {p.gpus} GPU(s)"
        )
        rows = _rows(p)
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _rows(p: StagePlan) -> list[tuple[str, str]]:
    def n(x: Any) -> str:
        return "?" if x is None else f"{x:,}"

    what = "every (video, caption) pair" if p.captions == "all" else "each video once, one random caption"
    batch = (
        f"global {p.global_batch:,} = {p.gpu_batch} per GPU x {p.gpus} GPU(s) x accumulation {p.accumulation}"
        if not p.batch_error
        else f"global {p.global_batch:,}: {p.batch_error}"
    )
    lrs = ", ".join(f"{k} {v:.3g}" for k, v in p.lr.items()) or "?"
    share = f" ({100 * p.warmup_share:.1f}% of the steps)" if p.warmup_share is not None else ""
    trainable = (
        p.trainable
        if isinstance(p.trainable, str)
        else ", ".join(f"{k} {v:,}" for k, v in p.trainable.items())
    )
    gen = p.generation
    low = gen["eval"]["min_new_tokens"]
    low = "the seed's minimum (T5 4, OPT/Vicuna 5)" if low is None else low
    lengths = f"{low}..{gen['eval']['max_new_tokens']} new tokens"
    val = gen["validation"]
    best_by = {"beam_cider_bleu4": "CIDEr-D + BLEU-4", "accuracy": "answer accuracy"}.get(
        val["select"], "CIDEr-D"
    )
    generation = (
        f"prompt {p.prompt!r}; validation {val['num_beams']} beam(s), best by {best_by}; "
        f"eval {gen['eval']['num_beams']} beams; {lengths}"
    )
    if "samples" in gen:
        s = gen["samples"]
        generation += f"; SCST {s['k']} samples, {s['baseline']} baseline, up to {s['max_new_tokens']} tokens"
    return [
        ("examples/epoch", f"{n(p.examples_per_epoch)} ({what}; {n(p.videos)} videos; {p.examples_from})"),
        (
            "steps",
            f"{n(p.total_steps)} = {p.epochs if p.epochs is not None else '?'} epochs of "
            f"{n(p.steps_per_epoch)}; validation every {n(p.val_every)} steps",
        ),
        ("batch", batch),
        ("warm-up", f"{p.warmup_steps:,} steps{share}"),
        ("lr", lrs),
        (
            "optimiser",
            f"AdamW, weight decay {p.weight_decay} (not on {', '.join(p.no_decay) or 'nothing'}, nor 1-d); "
            f"gradient clipping {p.grad_clip or 'off'}",
        ),
        (
            "frames",
            f"{p.frames} at {f'{p.image_size} px' if p.image_size else 'the checkpoint image size'}; {p.views}",
        ),
        ("precision", "; ".join(f"{k} {v}" for k, v in p.precision.items()) + " (on GPU; fp32 on CPU)"),
        ("trainable", trainable),
        ("generation", generation),
        *([("mixture", p.mixture)] if p.mixture else []),
    ]
