"""Stage `caption`: caption any video files with a trained (or zero-shot) model, at scale, resumably.

    vidcap caption videos/ more/*.mp4 list.txt --model runs/msrvtt/export --out captions.jsonl
    vidcap caption manifest.csv --model Salesforce/blip2-flan-t5-xl --out zs.jsonl --set caption.workers=4
    vidcap caption manifest.jsonl --model ... --out ... --set caption.scheduler=tcp://head:8786

Inputs are video files, folders (searched recursively for video extensions), globs, or
manifests: our JSONL (`video` or `video_id` per line), a CSV with a `path` (or `video`)
column, or a `.txt` list of paths (`pipeline/inputs.py`).
Each video becomes one JSON line in OUT, which says how its caption was made:

    {"video": "/abs/path.mp4", "caption": "a man is cooking",   # or "error": "<why it could not be read>"
     "confidence": 0.83, "mean_logprob": -0.19, "beam_agreement": 0.71,
     "model": "/abs/model", "model_sha256": "<hash of the model folder's files>", "num_frames": 8,
     "image_size": 224, "sampling": "uniform", "num_beams": 5, "max_new_tokens": 32, "min_new_tokens": 5}

`model_sha256` is `hub:<id>` for a hub id; for an export it covers its base folder too.
`confidence` (geometric-mean token probability of the caption), `mean_logprob` and, with beam
search, `beam_agreement` (word overlap of the top beams) are `pipeline/confidence.py`'s; they make
OUT a training set that keeps only confident captions (`format: captions_jsonl`, README,
Pseudo-labelling).

With `caption.window > 0`, a video becomes one line per window of that many seconds, with
`start`, `end`, `window` (its index), `windows` (their number) and `window_s` (the length).
The video is decoded once, front to back (`pipeline/windows.py`), and its windows are captioned
and written batch by batch as they come, so a long video holds a few batches in memory; a
video that fails part-way gets one `error` record, which stands for all its windows.
Re-running into an OUT written with another model (other files, wherever they lie), frames,
image size, beams, caption lengths or window is refused, with the differences listed.
`--retry-errors` attempts the videos with an `error` record again and keeps the rest.

How OUT stays correct when several workers write and anything can be killed
(`pipeline/runtime/records.py`):

* each task appends to its own part file `OUT.parts/<run>-<task>-<random>.jsonl`, one batch
  at a time, flushed and fsynced, so a kill loses at most the batches in flight;
* at the end, and at the start of the next run (which thereby finishes a killed run's work),
  the part files are merged into OUT, skipping any video OUT already holds;
* a video counts as done when OUT holds its record (all its windows, in window mode);
  re-running with the same OUT captions only the others, so nothing is done twice and no
  record is duplicated;
* one run at a time per OUT: a lock beside it (`.OUT.lock`) refuses a second concurrent run;
* OUT may not be one of the inputs (a manifest, a video): that is refused before anything is written.

Errors (missing, empty, corrupt, non-video files) become `error` records and never stop the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import torch

from pipeline.confidence import captions_with_confidence
from pipeline.config import Config, absolute_path, looks_like_local_path, model_location
from pipeline.errors import ConfigError
from pipeline.inputs import VideoInput, expand_inputs
from pipeline.model import EXPORT_FILE, VideoCaptioner, export_base, is_export
from pipeline.runtime.cluster import (
    Tally,
    chunk_size_for,
    configure_torch_threads,
    dask_client,
    describe_client,
    on_every_worker,
    prefetch_map,
    progress_counter,
    require_shared_paths,
    run_chunks,
    split_chunks,
    worker_cached,
)
from pipeline.runtime.files import disk_full_names
from pipeline.runtime.hashing import folder_sha256
from pipeline.runtime.records import (
    drop_error_records,
    exclusive_writer,
    merge_parts,
    read_records,
    recorded_videos,
)
from pipeline.runtime.stage import (
    Stage,
    StageError,
    check_outputs_apart,
    resolve_device,
    stage_entry,
    stage_logger,
)
from pipeline.sampling import EVAL_SAMPLING, normalize_frames
from pipeline.training import best_model_dir
from pipeline.video import VideoDecodeError, load_clip
from pipeline.vision import checkpoint_image_size
from pipeline.windows import iter_windows

CAPTIONS_FILE = "captions.jsonl"
TIMERS = ("decode_s", "decode_wait_s", "vit_s", "generate_s", "write_s")
PROGRESS_EVERY_S = 30.0  # a long windowed video logs how far it got this often


@stage_entry("caption")
def run(config: Config, force: bool = False) -> dict[str, Any]:
    """The pipeline's `caption` stage: caption `caption.inputs` with the run's model into `caption.out`."""
    if not config.caption.inputs:
        raise ConfigError(
            f"{config.source}: caption.inputs is empty; name the videos the caption stage captions"
        )
    stage = Stage(config, "caption", force=force)
    if stage.done:
        return stage.summary
    model = config.caption.model or str(best_model_dir(config.output_dir))
    out = config.caption.out or str(stage.dir / CAPTIONS_FILE)
    return stage.finish(caption_videos(list(config.caption.inputs), model, out, config))


def caption_videos(
    inputs: list[str], model_path: str, out_path: str, config: Config, retry_errors: bool = False
) -> dict[str, Any]:
    """Caption every video `inputs` name into the JSONL `out_path`, skipping those already in it.

    With `retry_errors`, the videos OUT holds an `error` record for are attempted again (their
    error records are dropped from OUT first; the new records go at its end).
    """
    started = time.time()
    config = config.with_absolute_paths()  # what the workers get, wherever they were started
    model_path, out = model_location(model_path), Path(absolute_path(out_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    log = stage_logger("caption", out.with_name(out.name + ".log"))
    cap = config.caption
    check_outputs_apart({"--out": out}, {f"input {name!r}": name for name in inputs})
    with exclusive_writer(out):
        settings = record_settings(model_path, config)
        _refuse_other_settings(out, settings)
        items = expand_inputs(inputs, log)
        order = [it.video for it in items]
        merge_parts(out, parts, order)  # first finish what a killed run left behind
        retried = drop_error_records(out) if retry_errors else 0
        if retried:
            log.info("caption: %d error records dropped from %s, to try their videos again", retried, out)
        recorded = recorded_videos(out)
        todo = [it for it in items if it.video not in recorded]
        nothing_to_do = not todo  # then no cluster is started
        with dask_client(
            0 if nothing_to_do else cap.workers, "" if nothing_to_do else cap.scheduler
        ) as client:
            mode = describe_client(client)
            log.info("caption: %d videos, %d already in %s, %d to caption; %s; model %s",
                     len(items), len(items) - len(todo), out, len(todo), mode, model_path)  # fmt: skip
            totals = _Totals(videos=len(items), skipped=len(items) - len(todo))
            if not nothing_to_do:
                local_model = model_path if os.path.isabs(model_path) else ""  # else a hub id
                shared = {
                    "model folder": local_model,
                    "output folder": str(out.parent),
                    "video": todo[0].video,
                }
                require_shared_paths(client, shared, log)
                on_every_worker(client, load_captioner, model_path, config)  # load before the clock starts
            totals.started = time.time()
            workers = len(client.nthreads()) if client is not None else 0
            chunks = split_chunks(todo, chunk_size_for(len(todo), cap.batch_size, workers))
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            tasks = [(f"{run_id}-{i:05d}", chunk) for i, chunk in enumerate(chunks)]
            with progress_counter(len(todo), "caption") as bar:
                run_chunks(client, caption_task, tasks, model_path, str(parts), config, settings,
                           on_result=totals.add, on_progress=bar.update)  # fmt: skip
        merge_parts(out, parts, order)
    summary = totals.summary(
        out, model_path, mode, setup_s=totals.started - started, seconds=time.time() - started
    )
    summary["retried"] = retried
    log.info(
        "caption: %d captioned, %d errors, %d skipped in %.1f s (setup %.1f s; %.2f videos/s; decode %.1f s, "
        "waited for decoding %.1f s, ViT %.1f s, generate %.1f s)",
        summary["captioned"], summary["errors"], summary["skipped"], summary["seconds"], summary["setup_s"],
        summary["videos_per_s"], summary["decode_s"], summary["decode_wait_s"], summary["vit_s"],
        summary["generate_s"],
    )  # fmt: skip
    return summary


# The keys of a record that say how its caption was made; a resume must match every one.
SETTINGS_KEYS = (
    "model_sha256",
    "num_frames",
    "image_size",
    "sampling",
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "window_s",
)


def record_settings(model_path: str, config: Config) -> dict[str, Any]:
    """What makes a caption what it is, written into every record and checked on resume: the
    model (its path for people, the hash of its files for the check), its frames, the decoding."""
    folder = Path(model_path)
    cap = config.caption
    settings: dict[str, Any] = {
        "model": str(folder.resolve()) if folder.is_dir() else model_path,  # a hub id as given
        "model_sha256": model_identity(model_path),
        **_model_frames(model_path, config),
        "sampling": EVAL_SAMPLING,
        "num_beams": cap.num_beams,
        "max_new_tokens": cap.max_new_tokens,
        "min_new_tokens": cap.min_new_tokens,
    }
    if cap.window > 0:
        settings["window_s"] = cap.window
    return settings


def model_identity(model_path: str) -> str:
    """The content hash of a model folder (with an export's base folder, when it is one); a hub id
    (nothing local to hash) is identified by its name."""
    folder = Path(model_path)
    if not folder.is_dir():
        if looks_like_local_path(model_path):
            raise ConfigError(f"no such model folder {model_path}")
        return f"hub:{model_path}"
    digest = folder_sha256(folder)
    base = export_base(folder) if is_export(folder) else None
    if base is not None:  # the export holds the trained parts; the rest comes from its base
        digest = hashlib.sha256(f"{digest}+{model_identity(base)}".encode()).hexdigest()
    return digest


def _model_frames(model_path: str, config: Config) -> dict[str, int]:
    """Frames and image size the model captions with: an export's own, else `config.model`'s."""
    model = config.model
    if is_export(Path(model_path)):
        model = json.loads((Path(model_path) / EXPORT_FILE).read_text())["model"]
        return {"num_frames": int(model["num_frames"]), "image_size": int(model["image_size"])}
    size = model.image_size or checkpoint_image_size(model_path)  # 0: the checkpoint's own, recorded as such
    return {"num_frames": model.num_frames, "image_size": size}


def _refuse_other_settings(out: Path, want: dict[str, Any]) -> None:
    """OUT's records must come from this model and these settings, or a resume would mix captions."""
    first = next(read_records(out), None)
    if first is None:
        return
    changed = [
        f"{k}: {first.get(k)!r} -> {want.get(k)!r}" for k in SETTINGS_KEYS if first.get(k) != want.get(k)
    ]
    if changed:
        if first.get("model") != want["model"]:
            changed.append(f"(model: {first.get('model')!r} -> {want['model']!r})")
        raise StageError(
            f"{out} holds captions made with other settings ({'; '.join(changed)}); "
            "use another --out, or delete it to caption again"
        )


class _Totals(Tally):
    """What the caption tasks report, added up; the summary `caption_videos` returns."""

    def __init__(self, videos: int, skipped: int) -> None:
        super().__init__(TIMERS, videos, skipped)
        self.captioned = self.errors = 0

    def add(self, result: dict[str, Any]) -> None:
        self.captioned += result["captioned"]
        self.errors += result["errors"]
        self.add_seconds({k: result[k] for k in TIMERS})
        self.add_fallbacks(result.get("decode_fallbacks", {}))

    def summary(self, out: Path, model: str, mode: str, setup_s: float, seconds: float) -> dict[str, Any]:
        common = self.common_summary(mode, self.captioned + self.errors, setup_s, seconds)
        return {"out": str(out), "model": model, "captioned": self.captioned, "errors": self.errors, **common}


# ----------------------------------------------------------------------------------------
# The work of one task: decode (threads) -> ViT -> generate -> part file
# ----------------------------------------------------------------------------------------


def load_captioner(model_path: str, config: Config) -> tuple[Any, dict[str, Any], str]:
    """(model, its frame settings, device) for this process, loaded once and reused by later tasks."""
    configure_torch_threads()
    device = resolve_device(config.run.device)

    def load() -> tuple[Any, dict[str, Any]]:

        if is_export(Path(model_path)):
            model = VideoCaptioner.from_trained(model_path, device=device)  # its own frames and size
        else:  # a base BLIP-2: zero-shot with config.model's settings
            model = VideoCaptioner.from_pretrained(model_path, config.model, load_vision=True, device=device)
        return model, {"num_frames": model.cfg.num_frames, "image_size": model.image_size}

    key = ("captioner", model_path, json.dumps(dataclasses.asdict(config.model), sort_keys=True), device)
    model, settings = worker_cached(key, load)
    return model, settings, device


def caption_task(
    task: tuple[str, list[VideoInput]],
    model_path: str,
    parts_dir: str,
    config: Config,
    base: dict[str, Any],
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Caption one chunk of videos into its own part file; returns counts and seconds.

    `base` is `record_settings(model_path, config)`, computed once by the caller: every record has it.
    """
    name, items = task
    model, settings, device = load_captioner(model_path, config)
    cap = config.caption
    result: dict[str, Any] = {
        "captioned": 0,
        "errors": 0,
        **dict.fromkeys(TIMERS, 0.0),
        "decode_fallbacks": {},
    }
    part = Path(parts_dir) / f"{name}-{uuid.uuid4().hex[:8]}.jsonl"  # a retried task gets a new file
    part.parent.mkdir(parents=True, exist_ok=True)
    with (
        ThreadPoolExecutor(max(1, cap.decode_workers), thread_name_prefix="decode") as pool,
        part.open("a", encoding="utf-8", buffering=1) as f,
    ):
        clips = _decoded(items, settings, config, pool, result)
        for batch in _clip_batches(clips, cap.batch_size):
            captions = _caption_batch(model, batch.pixels(), device, config, result) if batch.clips else []
            records = batch.records(captions, base)
            started = time.perf_counter()
            with disk_full_names(part):
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())
            result["write_s"] += time.perf_counter() - started
            # a video is finished by its error record or its last window (windows span batches)
            failed = {r["video"] for r in records if "error" in r}
            finished = failed | {r["video"] for r in records if r.get("window", 0) == r.get("windows", 1) - 1}
            result["errors"] += len(failed)
            result["captioned"] += len(finished - failed)
            if on_batch is not None and finished:
                on_batch(len(finished))
    return result


def _caption_batch(
    model: Any, pixels: Any, device: str, config: Config, timers: dict[str, float]
) -> list[dict[str, Any]]:
    """`{"caption", "confidence", "mean_logprob"[, "beam_agreement"]}` per clip (`pipeline/confidence.py`)."""

    cap = config.caption
    texts: list[dict[str, Any]] = []
    for first in range(0, pixels.shape[0], cap.batch_size):  # a long video's windows: several calls
        started = time.perf_counter()
        tokens = model.encode_frames(pixels[first : first + cap.batch_size])  # (B, T, L, D)
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # so the ViT's time is not billed to generate
        timers["vit_s"] += time.perf_counter() - started
        started = time.perf_counter()
        texts += captions_with_confidence(
            model, tokens, cap.num_beams, cap.max_new_tokens, cap.min_new_tokens
        )
        timers["generate_s"] += time.perf_counter() - started
    return texts


@dataclass
class _Clip:
    item: VideoInput
    pixels: Any = None  # (T, 3, S, S), None for an error
    error: str = ""
    start: float | None = None
    end: float | None = None
    window: int = 0
    windows: int = 1


class _ClipBatch:
    """Clips for one model call, plus the error clips that ride along; records come out per video."""

    def __init__(self) -> None:
        self.clips: list[_Clip] = []
        self.errors: list[_Clip] = []

    def pixels(self) -> Any:

        return torch.stack([c.pixels for c in self.clips])  # (B, T, 3, S, S)

    def records(self, captions: list[dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
        records = [_record(c, base, **caption) for c, caption in zip(self.clips, captions, strict=True)]
        return records + [_record(c, base, error=c.error) for c in self.errors]


def _record(clip: _Clip, base: dict[str, Any], **result: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"video": clip.item.video}
    if clip.item.video_id:
        record["video_id"] = clip.item.video_id
    record.update(result)
    record.update(base)
    if clip.start is not None:
        record.update(start=clip.start, end=clip.end, window=clip.window, windows=clip.windows)
    return record


def _clip_batches(clips: Iterator[_Clip], batch_size: int) -> Iterator[_ClipBatch]:
    """Batches of `batch_size` clips. A batch of whole videos ends only between videos; a long video's
    windows fill batch after batch, so memory holds one batch of windows whatever its length."""
    batch = _ClipBatch()
    for clip in clips:
        (batch.errors if clip.error else batch.clips).append(clip)
        last_of_video = clip.window == clip.windows - 1 or bool(clip.error)
        if len(batch.clips) >= batch_size and (last_of_video or clip.start is not None):
            yield batch
            batch = _ClipBatch()
    if batch.clips or batch.errors:
        yield batch


def _decoded(items: list[VideoInput], settings: dict[str, int], config: Config, pool: ThreadPoolExecutor,
             timers: dict[str, float]) -> Iterator[_Clip]:  # fmt: skip
    """Clips of `items` in order, decoded about two batches ahead: whole videos in `pool`, windows
    of one video after another in one thread of their own (`pipeline/windows.py`)."""
    ahead = 2 * config.caption.batch_size + config.caption.decode_workers
    if config.caption.window > 0:
        clips = _windowed_clips(items, settings, config)
        with ThreadPoolExecutor(1, thread_name_prefix="windows") as reader:
            for (clip, seconds), waited in prefetch_map(
                reader, lambda _: _timed(next, clips, None), count(), ahead
            ):
                if clip is None:
                    return
                timers["decode_s"] += seconds
                timers["decode_wait_s"] += waited
                yield clip
        return
    decode = partial(_decode_item, settings=settings, config=config)
    for (clips, seconds, fallbacks), waited in prefetch_map(pool, decode, items, ahead):
        timers["decode_s"] += seconds
        timers["decode_wait_s"] += waited
        for reason in set(fallbacks):  # once per video, however many windows it has
            timers["decode_fallbacks"][reason] = timers["decode_fallbacks"].get(reason, 0) + 1
        yield from clips


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def _decode_item(
    item: VideoInput, settings: dict[str, int], config: Config
) -> tuple[list[_Clip], float, list[str]]:
    """One whole video's clip as normalised pixels, or an error clip; and why decoding fell back to
    pyav, if it did."""
    started = time.perf_counter()
    fallbacks: list[str] = []
    try:
        frames = load_clip(
            item.video,
            settings["num_frames"],
            settings["image_size"],
            view=0,
            backend=config.decode.backend,
            threads=config.decode.threads,
            fallbacks=fallbacks,
        )  # (T, S, S, 3)
        clip = _Clip(item, normalize_frames(frames))
    except Exception as e:
        clip = _error_clip(item, e)
    return [clip], time.perf_counter() - started, fallbacks


def _windowed_clips(items: list[VideoInput], settings: dict[str, int], config: Config) -> Iterator[_Clip]:
    """The windows of each video in turn, decoded in one pass per video; a video that fails part-way
    ends with an error clip (its record then stands for the whole video). Logs progress per video."""
    log = logging.getLogger("vidcap.caption")
    for item in items:
        windows = iter_windows(item.video, settings["num_frames"], settings["image_size"], config.caption.window,
                               threads=config.decode.threads)  # fmt: skip
        started = last_report = time.perf_counter()
        try:
            for w in windows:
                yield _Clip(item, normalize_frames(w.frames), start=w.start, end=w.end, window=w.index,
                            windows=w.count)  # fmt: skip
                if time.perf_counter() - last_report > PROGRESS_EVERY_S:  # a long video says how far it got
                    last_report = time.perf_counter()
                    log.info("caption: %s: window %d/%d (%.0f s of video) after %.1f s", item.video,
                             w.index + 1, w.count, w.end, last_report - started)  # fmt: skip
        except Exception as e:
            yield _error_clip(item, e)


def _error_clip(item: VideoInput, error: Exception) -> _Clip:
    """A video that could not be captioned: why, as its record will say."""
    if isinstance(error, VideoDecodeError):
        return _Clip(item, error=str(error))
    # one video must never stop a run over millions: record why, go on
    return _Clip(item, error=f"{item.video}: {type(error).__name__}: {error}")
