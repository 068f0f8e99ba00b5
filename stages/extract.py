"""Stage `extract`: decode every video once, run the frozen ViT, store its tokens in the cache.

    vidcap extract --config configs/msrvtt_t5xl_ce.yaml                        # this process
    vidcap extract --config ... --set extract.workers=4                        # local Dask, 4 GPUs
    vidcap extract --config ... --set extract.scheduler=tcp://head:8786        # a Dask cluster

One video's way through: manifest record -> `load_views`, which decodes once every frame of
view 0 (uniform frames, the evaluation view) and of views 1..`cache.train_views` (head-tail
frames, random resized crop, flip; random choices seeded by `run.seed` and the video id) ->
CLIP normalisation ->
`FrameEncoder.encode_frames` (the ViT alone, without the LLM; bf16 autocast on CUDA) ->
`FeatureStore.write_video`, which marks it done. Videos are batched (`extract.batch_size` per
ViT call); a thread pool of `extract.decode_workers` decodes the next videos while the ViT
runs, and one writer thread compresses and writes the previous batch.

Resuming: the store records each finished video, so a re-run (after SIGKILL, say) extracts
only the pending ones. The store's fingerprint holds everything that determines the tokens,
the ViT weights' hash included (not the model id: the BLIP-2 Flan-T5 and OPT checkpoints
share one ViT); a config that would produce other tokens is refused with the differences,
unless `--force`, which starts a new store. A video that cannot be decoded is recorded as
failed with its reason and the stage goes on (exit status 0; `vidcap cache info` lists them).

With Dask, videos are cut into chunks of a few batches; each task loads the ViT once per
worker (`worker_cached`), writes its videos to the store itself, and returns one small
status per video.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from cache.store import FeatureStore, is_feature_store
from pipeline.annotations import load_manifest
from pipeline.config import Config
from pipeline.features import cache_fingerprint, hash_weights
from pipeline.runtime.cluster import (
    Tally,
    chunk_size_for,
    configure_torch_threads,
    dask_client,
    describe_client,
    on_every_worker,
    prefetch_map,
    progress_counter,
    release_cached,
    require_shared_paths,
    run_chunks,
    split_chunks,
    worker_cached,
)
from pipeline.runtime.files import disk_full_names
from pipeline.runtime.locks import output_lock
from pipeline.runtime.stage import Stage, StageError, resolve_device, stage_entry
from pipeline.sampling import normalize_frames
from pipeline.video import VideoDecodeError, load_views
from pipeline.vision import FrameEncoder, frame_size

MAX_FAILURES_IN_SUMMARY = 50
Video = tuple[str, str]  # (video_id, path)


@stage_entry("extract")
def run(config: Config, force: bool = False, retry_failed: bool = False) -> dict[str, Any]:
    """Extract the ViT tokens of every video of the manifest into `config.cache_path`; returns the summary.

    `retry_failed`: attempt the videos the store marks failed again (after fixing their files),
    even when the stage has finished; the videos done are kept.
    """
    stage = Stage(config, "extract", force=force)
    if stage.done:
        if not (retry_failed and _has_failures(config)):
            return stage.summary
        stage.reopen()  # its store stays; only the failed videos are attempted again
    started = time.time()
    config = config.with_absolute_paths()  # what the workers get, wherever they were started
    videos = manifest_videos(config)
    ex = config.extract
    with output_lock(config.cache_path, "feature store"), dask_client(ex.workers, ex.scheduler) as client:
        mode = describe_client(client)
        first_video = os.path.dirname(videos[0][1]) if videos else ""
        shared = {"model folder": _local(config.model.pretrained), "video folder": first_video}
        require_shared_paths(client, shared, stage.log)
        vit = _same_vit_everywhere(on_every_worker(client, describe_vit, config))  # loads the ViTs
        stage.replaces(config.cache_path, force, is_feature_store, "feature store")  # set aside till done
        store = open_store(config, [v for v, _ in videos], vit)
        require_shared_paths(client, {"feature store": str(store.path)}, stage.log)
        pending = set(store.pending_ids(retry_failed=retry_failed))
        todo = [v for v in videos if v[0] in pending]
        skipped = len(store.done_ids())
        stage.log.info("extract: %d videos, %d already done, %d to do; %s, %s %s; store %s", len(videos),
                       skipped, len(todo), mode, vit["device"], vit["dtype"], store.path)  # fmt: skip
        totals = _Totals(skipped=skipped, videos=len(videos))
        workers = max(1, len(client.nthreads())) if client is not None else 0
        chunks = split_chunks(todo, chunk_size_for(len(todo), ex.batch_size, workers))
        with progress_counter(len(todo), "extract") as bar:
            run_chunks(client, extract_videos, chunks, config, str(store.path), vit["dtype"],
                       on_result=lambda r: totals.add(r, stage.log), on_progress=bar.update)  # fmt: skip
    release_cached("vit")  # in-process, the next stages of run_pipeline need the memory, not the ViT
    summary = totals.summary(
        mode, store, vit, setup_s=totals.started - started, seconds=time.time() - started
    )
    fell_back = ""
    if config.decode.backend != "pyav":  # pyav is the exact path the others fall back to
        fell_back = (
            f"; decoded by pyav instead of {config.decode.backend}: {summary['decode_fallbacks'] or 'none'}"
        )
    stage.log.info(
        "extract: %d done, %d skipped, %d failed in %.1f s (setup %.1f s; %.2f videos/s; decode %.1f s "
        "in %d threads, waited for decoding %.1f s, ViT %.1f s, write %.1f s)%s",
        summary["done"], skipped, summary["failed"], summary["seconds"], summary["setup_s"],
        summary["videos_per_s"], summary["decode_s"], ex.decode_workers, summary["decode_wait_s"],
        summary["vit_s"], summary["write_s"], fell_back,
    )  # fmt: skip
    return stage.finish(summary)


def _has_failures(config: Config) -> bool:
    """Whether the finished stage's store marks any video failed."""
    return config.cache_path.exists() and bool(FeatureStore.open(config.cache_path).failed())


def _local(model: str) -> str:
    """The model's folder if it is one here (workers must see it too), else "" (a hub id)."""
    return model if os.path.isabs(model) else ""


def open_store(config: Config, video_ids: list[str], vit: dict[str, Any], overwrite: bool = False) -> Any:
    """The cache for these videos and this ViT: resumed if its fingerprint matches, else refused."""

    return FeatureStore.open_or_create(
        config.cache_path, video_ids, num_views=1 + config.cache.train_views, num_frames=config.model.num_frames,
        tokens_per_frame=vit["tokens_per_frame"], width=vit["width"], fingerprint=extract_fingerprint(config, vit),
        codec=config.cache.codec, level=config.cache.codec_level, overwrite=overwrite,
    )  # fmt: skip


def manifest_videos(config: Config) -> list[Video]:
    """(video_id, path) of the manifest's videos in order, restricted to `extract.splits` if set."""

    manifest = load_manifest(config.data)
    if not config.extract.splits:
        return [(r.video_id, r.path) for r in manifest.records]
    for name in config.extract.splits:
        manifest.split(name)  # an unknown split is an error naming the known ones
    wanted = set(config.extract.splits)
    return [(r.video_id, r.path) for r in manifest.records if r.split in wanted]


def extract_fingerprint(config: Config, vit: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the cached tokens (the store refuses to mix two of these)."""
    return cache_fingerprint(config, vit)


# ----------------------------------------------------------------------------------------
# The ViT, loaded once per process (per Dask worker)
# ----------------------------------------------------------------------------------------


def load_vit(config: Config) -> tuple[Any, str, str]:
    """(model, device, compute dtype) of this process, loaded on first use and then reused."""

    configure_torch_threads()
    device = resolve_device(config.run.device)

    def load() -> Any:

        return FrameEncoder.from_pretrained(config.model.pretrained, config.model, device)  # the ViT alone

    key = (
        "vit",
        config.model.pretrained,
        config.model.num_frames,
        config.model.image_size,
        config.model.dtype,
        device,
    )
    model = worker_cached(key, load)
    dtype = model.precision  # "float32", or bf16 autocast on CUDA (pipeline.vision.VIT_PRECISION)
    return model, device, dtype


def describe_vit(config: Config) -> dict[str, Any]:
    """What the store needs to know about this process's ViT: weights hash, token shape, device, dtype."""
    model, device, dtype = load_vit(config)
    key = ("vit-sha256", config.model.pretrained, config.model.dtype, device)
    return {
        "weights_sha256": worker_cached(key, lambda: hash_weights(model.vision_model)),
        "tokens_per_frame": int(model.tokens_per_frame),
        "image_size": int(model.image_size),
        "width": int(model.vision_width),
        "device": device,
        "dtype": dtype,
    }


def _same_vit_everywhere(vits: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ViT description; they must agree, or their tokens could not share one store."""
    keys = ("weights_sha256", "tokens_per_frame", "width", "dtype")
    for vit in vits[1:]:
        if any(vit[k] != vits[0][k] for k in keys):
            raise StageError(
                f"the Dask workers disagree about the ViT: {vits[0]} vs {vit}; "
                "give every worker the same model files and kind of device"
            )
    return vits[0]


# ----------------------------------------------------------------------------------------
# The work of one task: decode (threads) -> ViT (batches) -> store (writer thread)
# ----------------------------------------------------------------------------------------


def extract_videos(
    videos: list[Video], config: Config, store_path: str, expected_dtype: str,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Extract `videos` into the store; returns {"done": [ids], "failed": {id: reason}, "seconds": {...}}."""

    model, device, dtype = load_vit(config)
    if dtype != expected_dtype:
        raise RuntimeError(
            f"this worker computes in {dtype} on {device}, the store holds {expected_dtype} "
            "tokens: give every worker the same kind of device"
        )
    store = FeatureStore.open(store_path, mode="r+")
    result: dict[str, Any] = {"done": [], "failed": {}, "seconds": dict.fromkeys(_Totals.TIMERS, 0.0),
                              "decode_fallbacks": collections.Counter()}  # fmt: skip
    timers = result["seconds"]
    writing: Future | None = None  # the previous batch, written while the ViT runs on this one
    with ThreadPoolExecutor(max(1, config.extract.decode_workers), thread_name_prefix="decode") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:  # fmt: skip
        decoded = _decoded(videos, config, pool, timers, result["decode_fallbacks"])
        for batch in _batches(decoded, config.extract.batch_size):
            for video_id, error in batch.failures:
                store.mark_failed(video_id, error)
                result["failed"][video_id] = error
            if batch.ids:
                started = time.perf_counter()
                pixels = torch.cat(batch.frames)  # (B*V, T, 3, S, S)
                tokens = model.encode_frames(pixels).to(torch.float16).cpu()  # (B*V, T, L, D), as stored
                timers["vit_s"] += time.perf_counter() - started
                tokens = tokens.unflatten(0, (len(batch.ids), -1))  # (B, V, T, L, D)
                if writing is not None:
                    result["done"] += writing.result()
                writing = writer.submit(_write_batch, store, batch.ids, tokens, timers)
            if on_batch is not None:
                on_batch(len(batch.ids) + len(batch.failures))
        if writing is not None:
            result["done"] += writing.result()
    return result


def _write_batch(store: Any, ids: list[str], tokens: Any, timers: dict[str, float]) -> list[str]:
    started = time.perf_counter()
    for b, video_id in enumerate(ids):
        with disk_full_names(store.path):  # one line naming the store and its free space
            store.write_video(video_id, tokens[b].numpy())  # (V, T, L, D) float16
    timers["write_s"] += time.perf_counter() - started
    return list(ids)


class _Batch:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.frames: list[Any] = []  # (V, T, 3, S, S) per video
        self.failures: list[tuple[str, str]] = []


def _batches(decoded: Iterator[tuple[str, Any, str]], batch_size: int) -> Iterator[_Batch]:
    """Group decoded videos into ViT batches of `batch_size` videos; failures ride along."""
    batch = _Batch()
    for video_id, pixels, error in decoded:
        if error:
            batch.failures.append((video_id, error))
        else:
            batch.ids.append(video_id)
            batch.frames.append(pixels)
        if len(batch.ids) >= batch_size:
            yield batch
            batch = _Batch()
    if batch.ids or batch.failures:
        yield batch


def _decoded(videos: list[Video], config: Config, pool: ThreadPoolExecutor, timers: dict[str, float],
             fallbacks: collections.Counter[str]) -> Iterator[tuple[str, Any, str]]:  # fmt: skip
    """(video_id, pixels (V, T, 3, S, S) or None, error) in order, decoded about two batches ahead;
    counts the videos whose decoding fell back to pyav, by reason, into `fallbacks`."""
    ahead = 2 * config.extract.batch_size + config.extract.decode_workers
    decode = partial(_decode_video, config=config)
    for (video_id, pixels, error, seconds, reasons), waited in prefetch_map(pool, decode, videos, ahead):
        timers["decode_s"] += seconds
        timers["decode_wait_s"] += waited
        fallbacks.update(set(reasons))
        yield video_id, pixels, error


def _decode_video(video: Video, config: Config) -> tuple[str, Any, str, float, list[str]]:
    """All views of one video as normalised pixels, or the reason it cannot be decoded; and
    why the decoder fell back to pyav, if it did."""

    video_id, path = video
    started = time.perf_counter()
    fallbacks: list[str] = []
    try:
        clips = load_views(  # every frame any view needs decoded once: (V, T, S, S, 3) uint8
            path,
            config.model.num_frames,
            frame_size(config.model),
            views=range(1 + config.cache.train_views),
            seed=config.run.seed,
            video_id=video_id,
            backend=config.decode.backend,
            threads=config.decode.threads,
            fallbacks=fallbacks,
        )
        views = [normalize_frames(frames) for frames in clips]  # V x (T, 3, S, S)
    except (VideoDecodeError, OSError, ValueError, RuntimeError) as e:
        return video_id, None, _reason(e), time.perf_counter() - started, fallbacks
    return video_id, torch.stack(views), "", time.perf_counter() - started, fallbacks  # (V, T, 3, S, S)


def _reason(error: BaseException) -> str:

    if isinstance(error, VideoDecodeError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"file not found: {error.filename or error}"
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------
# Bookkeeping in the driver
# ----------------------------------------------------------------------------------------


class _Totals(Tally):
    """What the extract tasks report, added up in the driver; the stage summary."""

    TIMERS = ("decode_s", "decode_wait_s", "vit_s", "write_s")

    def __init__(self, skipped: int, videos: int) -> None:
        super().__init__(self.TIMERS, videos, skipped)
        self.done = 0
        self.failures: dict[str, str] = {}

    def add(self, result: dict[str, Any], log: Any) -> None:
        self.done += len(result["done"])
        for video_id, reason in result["failed"].items():
            log.warning("extract: %s failed: %s", video_id, reason)
            self.failures[video_id] = reason
        self.add_seconds(result["seconds"])
        self.add_fallbacks(result.get("decode_fallbacks", {}))

    def summary(
        self, mode: str, store: Any, vit: dict[str, Any], setup_s: float, seconds: float
    ) -> dict[str, Any]:
        info = store.info()
        return {
            **self.common_summary(mode, self.done + len(self.failures), setup_s, seconds),
            "store": str(store.path),
            "done": self.done,
            "failed": len(self.failures),
            "failures": dict(list(self.failures.items())[:MAX_FAILURES_IN_SUMMARY]),
            "store_done": info["done"],
            "store_failed": len(info["failed"]),
            "device": vit["device"],
            "dtype": vit["dtype"],
        }
