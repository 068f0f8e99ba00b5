"""Stage `eval`: caption a split with beam search and score it with coco-caption.

    vidcap eval --config configs/msrvtt_t5xl_lora_scst.yaml
    vidcap eval --config ... --set eval.models=ce,runs/other/train/best --set eval.source=video

Models (`eval.models`): `zero_shot` is `model.pretrained` as it is; `ce` the best CE model
(`<output_dir>/train/best`), `scst` the best SCST model (`<output_dir>/scst/best`); anything
else is a model folder written by `save_trained`, named by its folder name. `ce` or `scst`
without a checkpoint is skipped with a note; a folder that does not exist is an error.

Frame tokens come from the feature cache when `eval.source` is `cache`, or `auto` and the
cache covers the split (every video done, or recorded as failed by `extract`); the model is
then loaded without its ViT. Otherwise videos are decoded and run through the ViT here. A
video that cannot be decoded is listed in `metrics.json` under `failed` and left out of the
predictions and the scores; it does not stop the stage.

Captions: beam search (`eval.num_beams`, `eval.max_new_tokens`, `eval.min_new_tokens`; the
paper's 5, 32, 5). Scores: pycocoevalcap against every raw reference of each video (its PTB
tokenizer does the normalisation), on its 0..1 scale; the printed table shows x100.

Outputs, per model, under `<output_dir>/eval/<model>/`:
* `predictions.json`: `[{"video_id", "caption"}]` in split order;
* `metrics.json`: `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `num_videos`, `failed`, and
  `identity` (checkpoint, settings and source it was computed from). Written last, atomically:
  a model whose `metrics.json` has the same identity is not redone;
* `predictions.partial.jsonl` while it runs: captions batch by batch, so a killed run
  resumes mid-split instead of starting the model over.

A finished eval (`DONE.json`) is skipped only while its models still point at the same
weights: when `train/best` is retrained or `scst/best` appears, the changed models are
evaluated again and the others reused. Results of models no longer listed are renamed
`metrics.stale.json`, so run summaries never mix them in. `--force` redoes every model.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.store import FeatureStore, StoreError, diff_fingerprints
from pipeline.annotations import VideoRecord, load_manifest, require_references
from pipeline.config import Config
from pipeline.data import CacheSource, VideoSource
from pipeline.features import store_problems
from pipeline.metrics import coco_scores, require_java
from pipeline.model import VideoCaptioner, export_settings, is_export
from pipeline.published import format_table
from pipeline.qa import (
    QaItem,
    answer_generation,
    answer_questions,
    format_qa_table,
    load_qa,
    qa_accuracy,
    qa_dataset,
)
from pipeline.runtime.files import atomic_write_bytes, atomic_write_json
from pipeline.runtime.stage import Stage, StageError, progress, resolve_device, stage_entry
from pipeline.sampling import VIEW_SCHEME
from pipeline.video import VideoDecodeError
from pipeline.vision import frame_size

MODEL_KEYWORDS = {"ce": "train", "scst": "scst"}  # keyword -> stage whose `best/` it is
ZERO_SHOT = "zero_shot"
BEST_DIR = "best"
PARTIAL_FILE = "predictions.partial.jsonl"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """Folder name under `eval/` and row of the table."""
    path: Path | None
    """Export folder (`save_trained`); None for the zero-shot pretrained model."""


@stage_entry("eval")
def run(config: Config, force: bool = False) -> dict[str, Any]:
    """Caption and score the split with every model of `eval.models`; returns the summary."""
    stage = Stage(config, "eval", force=force)
    split = config.eval.split or config.data.test_split
    specs = resolve_models(config, stage.log)
    checkpoints = {spec.name: checkpoint_identity(config, spec) for spec in specs}
    if stage.done:
        if stage.summary.get("checkpoints") == checkpoints:
            _print_table(stage, config, stage.summary.get("metrics", {}), split)
            return stage.summary
        # Same settings, other weights (a checkpoint appeared or was retrained): the scores are stale.
        stage.log.info("eval: the models to evaluate changed since the last eval; evaluating again")
        stage.reopen()
    qa_items: list[QaItem] = []
    if config.data.task == "qa":  # questions about the split's videos instead of captions of them
        questions = load_qa(config.data)
        qa_items, records = questions.split(split), questions.records(split)
    else:
        require_java()  # fail before hours of beam search, not after
        manifest = load_manifest(config.data)
        require_references(manifest, split)  # before hours of captioning, naming the files searched
        records = manifest.split(split)
    source = choose_source(config, [r.video_id for r in records], stage.log)
    device = resolve_device(config.run.device)

    metrics: dict[str, dict[str, Any]] = {}
    predictions: dict[str, str] = {}
    for spec in specs:
        out_dir = stage.dir / spec.name
        model_source = source_for_model(config, spec, source, stage.log)
        identity = model_identity(config, spec, split, model_source)
        previous = _read_json(out_dir / "metrics.json")
        if previous is not None and previous.get("identity") == identity and not force:
            stage.log.info("eval %s: already scored with these settings, skipping", spec.name)
            metrics[spec.name] = previous
        elif config.data.task == "qa":
            metrics[spec.name] = evaluate_qa_model(
                config, spec, qa_items, records, source, device, out_dir, identity, stage
            )
        else:
            metrics[spec.name] = evaluate_model(
                config, spec, records, model_source, device, out_dir, identity, stage, resume=not force
            )
        predictions[spec.name] = str(out_dir / "predictions.json")
    _set_aside_stale_results(stage, set(metrics))
    _print_table(stage, config, metrics, split)
    scores = {name: {k: v for k, v in m.items() if k != "identity"} for name, m in metrics.items()}
    summary = {"split": split, "source": source, "metrics": scores, "predictions": predictions}
    return stage.finish({**summary, "checkpoints": checkpoints})


# ---------------------------------------------------------------------------------------
# What to evaluate, and where frame tokens come from
# ---------------------------------------------------------------------------------------


def resolve_models(config: Config, log: Any) -> list[ModelSpec]:
    """`eval.models` -> specs; missing `ce`/`scst` checkpoints are skipped, a missing folder is an error."""
    specs: list[ModelSpec] = []
    for entry in config.eval.models:
        if entry == ZERO_SHOT:
            specs.append(ModelSpec(ZERO_SHOT, None))
        elif entry in MODEL_KEYWORDS:
            path = config.stage_dir(MODEL_KEYWORDS[entry]) / BEST_DIR
            if not is_export(path):
                log.info(
                    "eval %s: no checkpoint at %s (stage %s not run?), skipping",
                    entry,
                    path,
                    MODEL_KEYWORDS[entry],
                )
                continue
            specs.append(ModelSpec(entry, path))
        else:
            path = Path(entry)
            if not is_export(path):
                raise StageError(
                    f"eval.models: {entry!r} is not zero_shot, ce, scst or a model folder "
                    "written by vidcap (no video_model.json there)"
                )
            specs.append(ModelSpec(path.resolve().name, path))
    names = [s.name for s in specs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise StageError(
            f"eval.models: two models would both be named {clashes[0]!r}; "
            "their results would share one folder"
        )
    return specs


def choose_source(config: Config, video_ids: Sequence[str], log: Any) -> str:
    """`cache` or `video`. `auto` takes the cache when it was extracted with this config's frames, image
    size and sampling, and every video of the split is done or recorded as failed in it (a video
    that failed to decode there would fail here too)."""
    wanted = config.eval.source
    if wanted == "video" or config.model.vit != "frozen":  # a trained ViT never reads the cache
        return "video"
    reason = _cache_problem(config, video_ids)
    if reason is None:
        return "cache"
    if wanted == "cache":
        raise StageError(
            f"eval.source=cache but the cache {config.cache_path} cannot serve split {config.eval.split or config.data.test_split!r}: "
            f"{reason}; run `vidcap extract` with these settings, or set eval.source=video"
        )
    log.info("eval: frame tokens from raw videos (cache %s: %s)", config.cache_path, reason)
    return "video"


def _cache_problem(config: Config, video_ids: Sequence[str]) -> str | None:
    """Why the cache cannot serve these videos (missing, other sampling, videos not extracted), or None."""

    path = config.cache_path
    if not path.exists():
        return "it does not exist"
    try:
        store = FeatureStore.open(path)
        settled = store.done_ids() | set(store.failed())
        # The ViT weights' hash needs the ViT itself; the sampling settings are checked here.
        wanted = {
            "num_frames": config.model.num_frames,
            "image_size": frame_size(config.model),
            "sampling": VIEW_SCHEME,
        }
        differences = diff_fingerprints({k: store.fingerprint.get(k) for k in wanted}, wanted)
    except (StoreError, OSError) as e:
        return f"cannot open it ({e})"
    if differences:
        return "it was extracted with other settings (" + "; ".join(differences) + ")"
    missing = [v for v in video_ids if v not in settled]
    if missing:
        return (
            f"{len(missing)} of {len(video_ids)} videos are neither done nor failed in it (e.g. {missing[0]})"
        )
    return None


def source_for_model(config: Config, spec: ModelSpec, source: str, log: Any) -> str:
    """The cache only when it holds this model's tokens: its ViT's weights, its frames and image size.

    A model trained with 4 frames must not be fed an 8-frame cache (without temporal embeddings
    nothing would notice). With `eval.source: auto` such a model is evaluated from raw videos
    (decoded with its own settings); with `cache` it is an error listing the differences.
    """
    if source != "cache":
        return source
    model_cfg = config.model if spec.path is None else export_settings(spec.path)
    store = FeatureStore.open(config.cache_path)
    problems = store_problems(store, config, model_cfg.pretrained, model_cfg, training=False)
    if not problems:
        return "cache"
    if config.eval.source == "cache":
        raise StageError(
            f"eval {spec.name}: the cache {config.cache_path} does not hold this model's frame tokens:\n  "
            + "\n  ".join(problems)
            + "\nextract a cache with the model's settings, or set eval.source=video"
        )
    log.info("eval %s: from raw videos, the cache was made otherwise (%s)", spec.name, "; ".join(problems))
    return "video"


def model_identity(config: Config, spec: ModelSpec, split: str, source: str) -> dict[str, Any]:
    """What a model's scores depend on; equal identity -> the saved scores stand."""
    ev, data = config.eval, config.data
    identity: dict[str, Any] = {
        "model": spec.name,
        "split": split,
        "source": source,
        "settings": {
            "num_beams": ev.num_beams,
            "max_new_tokens": ev.max_new_tokens,
            "min_new_tokens": ev.min_new_tokens,
            "metrics": list(ev.metrics),
            "data": [data.format, data.annotations, data.max_videos],
        },
        "checkpoint": checkpoint_identity(config, spec),
    }
    if config.data.task == "qa":
        identity["settings"]["qa"] = dataclasses.asdict(config.qa)
    if source == "cache":
        identity["cache"] = str(config.cache_path.resolve())
    else:
        identity["decode"] = [config.decode.backend, config.run.seed]
    return json.loads(json.dumps(identity))  # as it reads back from metrics.json (lists, not tuples)


def checkpoint_identity(config: Config, spec: ModelSpec) -> dict[str, Any]:
    """Which weights a model name stands for now: its folder, and the names, sizes, mtimes of its files."""
    if spec.path is None:
        model = json.loads(json.dumps(vars(config.model)))
        return {
            "pretrained": config.model.pretrained,
            "model": model,
            "files": _folder_hash(Path(config.model.pretrained)),
        }
    return {"path": str(spec.path.resolve()), "files": _folder_hash(spec.path)}


def _folder_hash(folder: Path) -> str:
    """Cheap identity of a local model folder: names, sizes, mtimes of its files ("" for a hub id)."""
    if not folder.is_dir():
        return ""
    stats = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def evaluate_model(
    config: Config,
    spec: ModelSpec,
    records: Sequence[VideoRecord],
    source: str,
    device: str,
    out_dir: Path,
    identity: dict[str, Any],
    stage: Stage,
    resume: bool = True,
) -> dict[str, Any]:
    """Caption `records` with one model, score the captions, write predictions.json and metrics.json."""

    log = stage.log
    partial = out_dir / PARTIAL_FILE
    captions, failed = _read_partial(partial, identity) if resume else ({}, {})
    _start_partial(partial, identity, captions, failed)
    todo = [r for r in records if r.video_id not in captions and r.video_id not in failed]
    log.info("eval %s: %d videos of split %s from %s (%d done before) on %s",
             spec.name, len(records), identity["split"], source, len(records) - len(todo), device)  # fmt: skip
    if todo:
        caption_split(config, spec, todo, source, device, partial, captions, failed)

    for video_id, reason in failed.items():
        log.warning("eval %s: video %s left out: %s", spec.name, video_id, reason)
    captioned = [r for r in records if r.video_id in captions]
    atomic_write_json(out_dir / "predictions.json", [{"video_id": r.video_id, "caption": captions[r.video_id]}
                                                     for r in captioned])  # fmt: skip
    scored = [r for r in captioned if r.captions]  # unlabelled videos get a caption but no score
    if not scored:
        raise StageError(f"eval {spec.name}: no video of the split has both a caption and references "
                         f"({len(failed)} failed to decode)")  # fmt: skip
    scores = coco_scores(
        {r.video_id: list(r.captions) for r in scored},
        {r.video_id: captions[r.video_id] for r in scored},
        metrics=tuple(config.eval.metrics),
    )
    metrics = {
        **{k: float(v) for k, v in scores.items()},
        "num_videos": len(scored),
        "failed": [{"video_id": v, "reason": failed[v]} for v in sorted(failed)],
        "identity": identity,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)  # last: its presence means "this model is done"
    partial.unlink(missing_ok=True)
    log.info("eval %s: %s", spec.name, ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items()))
    return metrics


def evaluate_qa_model(config: Config, spec: ModelSpec, items: Sequence[QaItem], records: Sequence[VideoRecord],
                      source: str, device: str, out_dir: Path, identity: dict[str, Any], stage: Stage) -> dict[str, Any]:  # fmt: skip
    """Answer every question of the split with one model (`qa` generation settings); write
    predictions.json and metrics.json: top-1 accuracy overall and per question type (`by_type`)."""
    model = load_model(config, spec, source, device)
    frames = _frame_source(config, model, records, source)
    failures = _cache_failures(frames)
    todo = [item for item in items if item.video_id not in failures]
    stage.log.info("eval %s: %d questions about %d videos of split %s from %s on %s",
                   spec.name, len(items), len(records), identity["split"], source, device)  # fmt: skip
    answers = answer_questions(
        model, frames, todo, config.qa.prompt, config.eval.batch_size, device, **answer_generation(config.qa)
    )
    del model, frames
    gc.collect()
    failed = {v: f"extract failed: {failures[v]}" for v in {i.video_id for i in items} if v in failures}
    failed.update({i.video_id: "could not be decoded" for i in todo if i.question_id not in answers})
    answered = [item for item in items if item.video_id not in failed]
    if not answered:
        raise StageError(
            f"eval {spec.name}: no question of the split could be answered ({len(failed)} videos failed)"
        )
    rows = [{"question_id": i.question_id, "video_id": i.video_id, "question": i.question, "answer": i.answer,
             "prediction": answers[i.question_id]} for i in answered]  # fmt: skip
    atomic_write_json(out_dir / "predictions.json", rows)
    scores = qa_accuracy(answered, answers)
    metrics = {
        **scores,
        "failed": [{"video_id": v, "reason": failed[v]} for v in sorted(failed)],
        "identity": identity,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)  # last: its presence means "this model is done"
    stage.log.info(
        "eval %s: accuracy %.1f on %d questions", spec.name, 100 * scores["accuracy"], len(answered)
    )
    return metrics


def caption_split(config: Config, spec: ModelSpec, todo: Sequence[VideoRecord], source: str, device: str,
                   partial: Path, captions: dict[str, str], failed: dict[str, str]) -> None:  # fmt: skip
    """Beam-search captions of `todo` into `captions` (bad videos into `failed`), appended batch by
    batch to the `partial` file so that a killed run resumes after the last finished batch."""
    model = load_model(config, spec, source, device)
    frames = _frame_source(config, model, todo, source)
    batch_size = config.eval.batch_size
    with partial.open("a", encoding="utf-8") as sink:
        batches = _batches(frames, todo, batch_size, device)
        for batch, tokens, batch_failed in progress(batches, total=-(-len(todo) // batch_size),
                                                    desc=f"eval {spec.name}"):  # fmt: skip
            texts = _caption(model, tokens, config) if tokens is not None else []
            kept = [r for r in batch if r.video_id not in batch_failed]
            rows = [{"video_id": r.video_id, "caption": t} for r, t in zip(kept, texts, strict=True)]
            rows += [{"video_id": v, "error": reason} for v, reason in batch_failed.items()]
            sink.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            sink.flush()
            captions.update({r["video_id"]: r["caption"] for r in rows if "caption" in r})
            failed.update(batch_failed)
    del model, frames
    gc.collect()  # free this model before the next one is loaded

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model(config: Config, spec: ModelSpec, source: str, device: str) -> Any:
    """The model to caption with; without its ViT when tokens come from the cache."""

    vision = source == "video"
    if spec.path is None:
        return VideoCaptioner.from_pretrained(
            config.model.pretrained, config.model, load_vision=vision, device=device
        )
    return VideoCaptioner.from_trained(spec.path, device=device, load_vision=vision)


def _frame_source(config: Config, model: Any, records: Sequence[VideoRecord], source: str) -> Any:

    if source == "cache":
        return CacheSource(FeatureStore.open(config.cache_path))
    # The model's own settings (frames, image size), which a trained model carries with it.
    return VideoSource(records, model, config.decode, model.cfg, seed=config.run.seed)


def _caption(model: Any, tokens: Any, config: Config) -> list[str]:
    ev = config.eval
    out = model.generate(
        tokens, num_beams=ev.num_beams, max_new_tokens=ev.max_new_tokens, min_new_tokens=ev.min_new_tokens
    )
    return list(out.texts)


def _batches(
    frames: Any, records: Sequence[VideoRecord], batch_size: int, device: str
) -> Iterator[tuple[list[VideoRecord], Any, dict[str, str]]]:
    """(batch, frame tokens (B', T, L, D) of its good videos or None, {video_id: reason} of the bad).

    Reading the next batch (decoding, or the Zarr read) overlaps with captioning this one.
    """
    batches = [list(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    failures = _cache_failures(frames)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_load, frames, batches[0], failures) if batches else None
        for i, batch in enumerate(batches):
            loaded, batch_failed = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(_load, frames, batches[i + 1], failures)
            yield batch, (frames.encode(loaded, device) if loaded is not None else None), batch_failed


def _cache_failures(frames: Any) -> dict[str, str]:
    store = getattr(frames, "store", None)
    return store.failed() if store is not None else {}


def _load(frames: Any, batch: list[VideoRecord], failures: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """The reader's output for the batch's good videos, and the reasons of those that failed."""

    ids = [r.video_id for r in batch]
    failed = {v: f"extract failed: {failures[v]}" for v in ids if v in failures}
    ids = [v for v in ids if v not in failed]
    if not ids:
        return None, failed
    try:
        return frames.reader(ids, [0] * len(ids)), failed
    except VideoDecodeError:
        pass  # find which ones, one by one, and keep their reasons

    good = []
    for video_id in ids:
        try:
            good.append(frames.reader([video_id], [0]))
        except VideoDecodeError as e:
            failed[video_id] = e.reason
    return (torch.cat(good) if good else None), failed


# ---------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------


def _read_partial(path: Path, identity: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Captions and failures of a killed run, if it had the same identity; a torn last line is dropped."""
    captions: dict[str, str] = {}
    failed: dict[str, str] = {}
    if not path.exists():
        return captions, failed
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not header or header.get("identity") != identity:
        return captions, failed
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # torn by a kill: this and anything after is redone
        if "caption" in row:
            captions[row["video_id"]] = row["caption"]
        else:
            failed[row["video_id"]] = row["error"]
    return captions, failed


def _start_partial(
    path: Path, identity: dict[str, Any], captions: dict[str, str], failed: dict[str, str]
) -> None:
    """Rewrite the partial file with its header and the rows kept (drops a torn tail), atomically."""
    rows = [{"identity": identity}]
    rows += [{"video_id": v, "caption": c} for v, c in captions.items()]
    rows += [{"video_id": v, "error": r} for v, r in failed.items()]
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def _set_aside_stale_results(stage: Stage, evaluated: set[str]) -> None:
    """Rename the metrics of models this run did not evaluate, so no summary mistakes them for current."""
    for path in sorted(stage.dir.glob("*/metrics.json")):
        if path.parent.name not in evaluated:
            stage.log.warning("eval: %s is not among this run's models; renamed to metrics.stale.json", path)
            path.replace(path.with_name("metrics.stale.json"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _print_table(stage: Stage, config: Config, metrics: dict[str, dict[str, Any]], split: str) -> None:
    if metrics and config.data.task == "qa":
        stage.log.info("eval results:\n%s", format_qa_table(metrics, qa_dataset(config), split))
    elif metrics:
        stage.log.info("eval results:\n%s", format_table(metrics, config.data.format, split))
