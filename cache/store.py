"""The feature store: per-frame ViT tokens of every video, written once by `extract`, read by training.

On-disk layout (a Zarr v3 directory store; everything but `status/` is plain Zarr, so
`zarr.open_group(path, mode="r")` reads it without vidcap):

    <store>/
      zarr.json              group; attributes:
                               format_version  1
                               fingerprint     {key: value} of everything that determines the
                                               tokens (ViT weights hash, model id, frames, image
                                               size, sampling, views, seed, dtype...), from the caller
                               shape           {videos: N, views: V, frames: T, tokens_per_frame: L, width: D}
                               codec           {name: "zstd" | "lz4" | "blosc-zstd" | "blosc-lz4" | "none", level}
      tokens/                float16 (N, V, T, L, D); chunk (1, 1, T, L, D) = one chunk per (video, view),
                             so concurrent writers of different videos never touch the same file.
                             View 0 is the deterministic evaluation sampling, views 1.. are augmented
                             training samplings. Chunk (i, v) is the file tokens/c/<i>/<v>/0/0/0.
      video_ids/             string (N,): the ids in manifest order; video i is tokens[i].
      status/done/<i>        marker: video i is completely written; content {"video_id", "chunks":
                             [[bytes, crc32] or null per view]}, the size and CRC-32 of each chunk
                             file as written (null: an all-zero chunk, which zarr does not store)
      status/failed/<i>.json {"video_id": ..., "reason": ...}: video i could not be extracted

    tokens = zarr.open_group(path, mode="r")["tokens"][i, 0]   # (T, L, D) of video i, view 0
    done = sorted(int(n) for n in os.listdir(f"{path}/status/done") if n.isdigit())

Why marker files and not a list in the attributes: a list would be read-modify-written by
every writer, so two processes (possibly on different machines over a shared filesystem)
finishing at once would lose one update, and a writer killed mid-update could tear it.
A marker per video is written by exactly one writer and needs no lock. `write_video`
writes the video's chunks, fsyncs them, and only then creates `status/done/<i>` atomically
(temporary file, fsync, `os.replace`). A process killed at any instant therefore leaves
either no marker (the video is pending and will be rewritten) or a marker whose chunks are
complete; a half-written chunk never counts as done. Listing is one `os.scandir`.

A reader proves what it serves: before decoding a chunk of a done video, `read` checks the
chunk file's size and CRC-32 against the marker, so a chunk deleted or damaged on disk is a
`StoreError` naming the video (zarr alone would return the fill value, zeros, for a missing
chunk, and a blosc traceback for a truncated one). `verify` checks every done video;
`vidcap cache info --verify [--repair]` runs it (and with `--repair` marks the damaged videos
pending, so `extract` redoes them). Markers of older stores hold only the id: their chunks are
decoded, not checksummed.

Done wins over failed: a video with both markers (killed between writing the done marker
and removing an old failure marker) is done. Failed videos are not retried by default
(`pending_ids(retry_failed=False)`): a file that cannot be decoded fails again; pass
`retry_failed=True` after fixing the cause.

Creation is atomic too: the group is built in a hidden sibling folder and renamed into place,
so a store either does not exist or has all its metadata (a kill during `create` leaves only a
`.<name>.creating-*` folder, which can be deleted).

A `FeatureStore` pickles as its path and mode; each process (DataLoader or Dask worker) opens
the Zarr arrays lazily on first use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.errors import FingerprintMismatch, StoreError
from pipeline.runtime.files import atomic_write_bytes, fsync_path

FORMAT_VERSION = 1
CODECS = ("zstd", "lz4", "blosc-zstd", "blosc-lz4", "none")
DEFAULT_CODEC = (
    "blosc-zstd"  # smallest on ViT-like tokens (0.86 of raw), 80-120 videos/s reads: bench_store.py
)
DEFAULT_LEVEL = 3
IDS_CHUNK = 65536  # ids per chunk of `video_ids`
BLOSC_BLOCK = 1 << 18  # bytes per blosc block
READ_THREADS = 8  # chunks read at once by `read`; decompression releases the GIL


def make_codecs(name: str, level: int) -> dict[str, Any]:
    """Zarr `create_array` keyword arguments (`compressors`) for a codec name and level.

    Only the high byte of a float16 (sign, exponent, 2 mantissa bits) of ViT tokens is
    compressible; the low byte is noise. `blosc-zstd` byte-shuffles the values so that the
    high bytes form their own stream, which zstd then entropy-codes: 0.86 of the raw size
    against 0.93 for plain `zstd` (benchmarks/bench_store.py). lz4 has no entropy coder and
    gains nothing on these data; `lz4` ignores `level` (numcodecs' LZ4 has none).
    """
    if name == "none":
        return {"compressors": None}
    if name == "zstd":
        return {"compressors": zarr.codecs.ZstdCodec(level=level)}
    if name == "lz4":  # a numcodecs codec: readable by zarr-python with numcodecs installed
        return {"compressors": zarr.codecs.numcodecs.LZ4(acceleration=1)}
    if name in ("blosc-zstd", "blosc-lz4"):
        # Blosc's automatic block size for zstd is small enough to defeat the shuffle (0.93):
        # blocks of 256 KiB keep the shuffled byte streams long enough to compress (0.86).
        blosc = zarr.codecs.BloscCodec(
            cname=name.split("-")[1], clevel=level, shuffle="shuffle", typesize=2, blocksize=BLOSC_BLOCK
        )
        return {"compressors": blosc}
    raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")


def diff_fingerprints(cache: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """One line per differing key: "num_frames: cache 8, config 16"."""
    cache, config = _jsonable(cache), _jsonable(config)

    def show(d: dict[str, Any], key: str) -> str:
        return repr(d[key]) if key in d else "<missing>"

    keys = sorted(set(cache) | set(config), key=str)
    return [
        f"{key}: cache {show(cache, key)}, config {show(config, key)}"
        for key in keys
        if key not in cache or key not in config or cache[key] != config[key]
    ]


class FeatureStore:
    """A Zarr store of float16 ViT tokens (N videos, V views, T frames, L tokens, D width)."""

    def __init__(self, path: str | Path, mode: str = "r"):
        """Use `create`, `open` or `open_or_create`; this only records where the store is."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._reset()

    def _reset(self) -> None:
        self._group: zarr.Group | None = None
        self._tokens: zarr.Array | None = None
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.mode = state["path"], state["mode"]
        self._reset()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, mode={self.mode!r})"

    def __len__(self) -> int:
        return len(self.video_ids)

    # ---------------------------------------------------------------- create / open

    @classmethod
    def create(
        cls,
        path: str | Path,
        video_ids: Sequence[str],
        num_views: int,
        num_frames: int,
        tokens_per_frame: int,
        width: int,
        fingerprint: dict[str, Any],
        codec: str = DEFAULT_CODEC,
        level: int = DEFAULT_LEVEL,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Create an empty store (no video done). An existing one is an error unless `overwrite`."""
        path = Path(path)
        ids = [str(v) for v in video_ids]
        _check_new_store(ids, (num_views, num_frames, tokens_per_frame, width), codec)
        if path.exists() and not overwrite:
            raise StoreError(f"{path} already exists; use open_or_create to resume, or overwrite=True")
        if path.exists() and not is_feature_store(path):
            raise StoreError(
                f"{path} exists and is not a vidcap feature store (no zarr.json with our format_version "
                "and fingerprint): refusing to replace it; choose another cache.path or move it yourself"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
        try:
            _write_empty_store(
                tmp, ids, (num_views, num_frames, tokens_per_frame, width), fingerprint, codec, level
            )
            if overwrite and path.exists():
                trash = path.parent / f".{path.name}.deleting-{uuid.uuid4().hex[:8]}"
                os.rename(path, trash)
                shutil.rmtree(trash)
            os.rename(tmp, path)  # atomic; fails if another process created `path` meanwhile
        except OSError as err:
            if path.exists():
                raise StoreError(f"{path} was created by another process meanwhile") from err
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path, mode="r+")

    @classmethod
    def open(
        cls, path: str | Path, fingerprint: dict[str, Any] | None = None, mode: str = "r"
    ) -> FeatureStore:
        """Open an existing store; with `fingerprint`, raise `FingerprintMismatch` if it differs."""
        store = cls(path, mode=mode)
        attrs = store._attrs()  # raises StoreError if it is not a store
        if attrs.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(
                f"{path} has format_version {attrs['format_version']}; this vidcap reads <= {FORMAT_VERSION}"
            )
        if fingerprint is not None:
            differences = diff_fingerprints(attrs.get("fingerprint", {}), fingerprint)
            if differences:
                raise FingerprintMismatch(path, differences)
        return store

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        video_ids: Sequence[str],
        num_views: int,
        num_frames: int,
        tokens_per_frame: int,
        width: int,
        fingerprint: dict[str, Any],
        codec: str = DEFAULT_CODEC,
        level: int = DEFAULT_LEVEL,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Resume: open the store if it exists with the same fingerprint, shape and video ids, else create it.

        A different fingerprint or shape raises `FingerprintMismatch`, different ids `StoreError`
        (each saying what differs). The codec of an existing store is kept.
        """
        args = (path, video_ids, num_views, num_frames, tokens_per_frame, width, fingerprint, codec, level)
        if overwrite or not Path(path).exists():
            try:
                return cls.create(*args, overwrite=overwrite)
            except StoreError:
                if overwrite or not Path(path).exists():
                    raise  # otherwise another process created it first: open theirs
        store = cls(path, mode="r+")
        want = {
            "views": num_views,
            "frames": num_frames,
            "tokens_per_frame": tokens_per_frame,
            "width": width,
        }
        have = {k: store.shape_dict.get(k) for k in want}
        differences = diff_fingerprints(store.fingerprint, fingerprint) + diff_fingerprints(have, want)
        if differences:
            raise FingerprintMismatch(path, differences)
        _check_same_ids(path, store.video_ids, [str(v) for v in video_ids])
        return store

    # ---------------------------------------------------------------- metadata

    def _open_group(self) -> zarr.Group:
        if self._group is None:
            if not (self.path / "zarr.json").is_file():
                raise StoreError(f"no feature store at {self.path} (no zarr.json)")
            with warnings.catch_warnings():  # the lz4 codec is "not in the Zarr v3 spec": known
                warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
                with _damaged_metadata(self.path):
                    group = zarr.open_group(self.path, mode=self.mode)
                    try:
                        self._tokens = group["tokens"]
                    except KeyError:
                        raise StoreError(
                            f"{self.path} is a Zarr group but not a vidcap feature store"
                        ) from None
            self._group = group
        return self._group

    def _attrs(self) -> dict[str, Any]:
        attrs = dict(self._open_group().attrs)
        if "fingerprint" not in attrs:
            raise StoreError(f"{self.path} is a Zarr group but not a vidcap feature store (no fingerprint)")
        return attrs

    @property
    def tokens(self) -> zarr.Array:
        """The Zarr array (N, V, T, L, D), opened lazily in this process."""
        self._open_group()
        return self._tokens

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._attrs()["fingerprint"]

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(N, V, T, L, D)."""
        return tuple(self.tokens.shape)

    @property
    def shape_dict(self) -> dict[str, int]:
        return dict(zip(("videos", "views", "frames", "tokens_per_frame", "width"), self.shape, strict=True))

    @property
    def video_ids(self) -> list[str]:
        if self._ids is None:
            group = self._open_group()
            with _damaged_metadata(self.path):
                self._ids = [str(v) for v in group["video_ids"][:].tolist()]
        return self._ids

    def index_of(self, video_id: str) -> int:
        if self._index is None:
            self._index = {v: i for i, v in enumerate(self.video_ids)}
        try:
            return self._index[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in the feature store {self.path}") from None

    def _resolve(self, item: str | int) -> int:
        if isinstance(item, (int, np.integer)):
            if not 0 <= item < len(self.video_ids):
                raise IndexError(f"video index {item} out of range for {len(self.video_ids)} videos")
            return int(item)
        return self.index_of(item)

    # ---------------------------------------------------------------- writing

    def write_video(self, video_id: str, tokens: Any) -> None:
        """Store one video's tokens (V, T, L, D) as float16, then mark it done (and not failed)."""
        self._check_writable()
        index = self.index_of(video_id)
        array = _as_float16(tokens)
        expected = self.shape[1:]
        if array.shape != expected:
            raise ValueError(
                f"tokens of video {video_id!r} have shape {array.shape}, the store expects {expected}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"tokens of video {video_id!r} are not finite after the cast to float16")
        done = self._status_dir("done") / str(index)
        done.unlink(missing_ok=True)  # a rewrite of a done video is not done until it completes
        self.tokens[index] = array  # (V, T, L, D): V chunks, each replaced atomically by zarr
        self._fsync_chunks(index)
        record = {"video_id": video_id, "chunks": [self._chunk_sum(index, v) for v in range(self.shape[1])]}
        atomic_write_bytes(done, json.dumps(record).encode())
        (self._status_dir("failed") / f"{index}.json").unlink(missing_ok=True)

    def mark_failed(self, video_id: str, reason: str) -> None:
        """Record that a video could not be extracted (it stays not done)."""
        self._check_writable()
        index = self.index_of(video_id)
        record = json.dumps({"video_id": video_id, "reason": str(reason)}) + "\n"
        atomic_write_bytes(self._status_dir("failed") / f"{index}.json", record.encode())

    def _check_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to write")

    def _chunk_file(self, index: int, view: int) -> Path:
        return self.path / "tokens" / self.tokens.metadata.encode_chunk_key((index, view, 0, 0, 0))

    def _chunk_sum(self, index: int, view: int) -> list[int] | None:
        """[bytes, CRC-32] of a chunk file as it is on disk; None when zarr stored none (all zeros)."""
        try:
            data = self._chunk_file(index, view).read_bytes()
        except FileNotFoundError:
            return None
        return [len(data), zlib.crc32(data)]

    def _fsync_chunks(self, index: int) -> None:
        # Chunks must be on disk before the marker that vouches for them (power loss, NFS).
        dirs = set()
        for view in range(self.shape[1]):
            chunk = self._chunk_file(index, view)
            dirs.add(chunk.parent)
            fsync_path(chunk)
        for d in dirs:
            fsync_path(d)

    # ---------------------------------------------------------------- status

    def _status_dir(self, kind: str) -> Path:
        return self.path / "status" / kind

    def _marked(self, kind: str) -> set[int]:
        indices = set()
        with os.scandir(self._status_dir(kind)) as entries:
            for entry in entries:
                stem = entry.name.removesuffix(".json")
                if stem.isdigit():  # skips temporary files of writes in progress
                    indices.add(int(stem))
        return {i for i in indices if i < len(self.video_ids)}

    def done_ids(self) -> set[str]:
        ids = self.video_ids
        return {ids[i] for i in self._marked("done")}

    def failed(self) -> dict[str, str]:
        """video_id -> reason, for failed videos that are not done (manifest order)."""
        indices = sorted(self._marked("failed") - self._marked("done"))
        result = {}
        for i in indices:
            try:
                record = json.loads((self._status_dir("failed") / f"{i}.json").read_text())
                result[self.video_ids[i]] = record.get("reason", "")
            except FileNotFoundError:
                continue  # it succeeded meanwhile
        return result

    def pending_ids(self, retry_failed: bool = False) -> list[str]:
        """Videos still to extract, in manifest order: not done, and not failed unless `retry_failed`."""
        skip = self._marked("done") | (set() if retry_failed else self._marked("failed"))
        return [v for i, v in enumerate(self.video_ids) if i not in skip]

    def is_done(self, video_id_or_index: str | int) -> bool:
        return (self._status_dir("done") / str(self._resolve(video_id_or_index))).exists()

    # ---------------------------------------------------------------- reading

    def read(self, videos: Sequence[str | int] | str | int, views: int | Sequence[int] = 0) -> np.ndarray:
        """Tokens (B, T, L, D) float16 of done videos (ids or indices), one view each.

        `views` is one view for all, or one per video. Chunks are read by a few threads at once.
        """
        items = [videos] if isinstance(videos, (str, int, np.integer)) else list(videos)
        indices = [self._resolve(v) for v in items]
        per_item = [views] * len(indices) if isinstance(views, (int, np.integer)) else [int(v) for v in views]
        if len(per_item) != len(indices):
            raise ValueError(f"got {len(per_item)} views for {len(indices)} videos")
        num_views = self.shape[1]
        if any(not 0 <= view < num_views for view in per_item):
            raise IndexError(f"views {per_item} out of range: the store has {num_views} views")
        not_done = [i for i in indices if not (self._status_dir("done") / str(i)).exists()]
        if not_done:
            names = ", ".join(f"{self.video_ids[i]!r} (index {i})" for i in not_done[:5])
            more = f" and {len(not_done) - 5} more" if len(not_done) > 5 else ""
            raise StoreError(f"not done in {self.path}: {names}{more}")
        out = np.empty((len(indices), *self.shape[2:]), dtype=np.float16)  # (B, T, L, D)

        def load(b: int) -> None:
            out[b] = self._read_chunk(indices[b], per_item[b])

        if len(indices) <= 1:
            for b in range(len(indices)):
                load(b)
        else:
            with ThreadPoolExecutor(min(READ_THREADS, len(indices))) as pool:
                list(pool.map(load, range(len(indices))))
        return out

    def _read_chunk(self, index: int, view: int, marker: dict[str, Any] | None = None) -> np.ndarray:
        """(T, L, D) of a done video's view, after checking its chunk against the done marker."""
        problem = self._chunk_problem(index, view, marker)
        if problem:
            raise StoreError(self._damaged(index, problem))
        try:
            return self.tokens[index, view]
        except Exception as e:  # a codec error on a damaged chunk of an older store (no checksum)
            raise StoreError(self._damaged(index, f"chunk of view {view} cannot be decoded ({e})")) from e

    def _marker(self, index: int) -> dict[str, Any] | None:
        """The done marker's record, or None for an older store's marker (the bare id)."""
        try:
            record = json.loads((self._status_dir("done") / str(index)).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) and "chunks" in record else None

    def _chunk_problem(self, index: int, view: int, marker: dict[str, Any] | None = None) -> str:
        """Why a done video's chunk does not match its marker ("" when it does)."""
        marker = marker if marker is not None else self._marker(index)
        if marker is None:
            return ""
        expected = marker["chunks"][view]
        have = self._chunk_sum(index, view)
        if have == expected:
            return ""
        chunk = self._chunk_file(index, view)
        if have is None:
            return f"its chunk of view {view} ({chunk}) is missing"
        if expected is None:
            return f"its chunk of view {view} ({chunk}) should not exist (all zeros when written)"
        if have[0] != expected[0]:
            return f"its chunk of view {view} ({chunk}) has {have[0]} bytes, {expected[0]} were written"
        return f"its chunk of view {view} ({chunk}) is corrupt (CRC-32 differs from the one written)"

    def _damaged(self, index: int, problem: str) -> str:
        return (
            f"video {self.video_ids[index]!r} (index {index}) is marked done in {self.path} but {problem}; "
            f"run `vidcap cache info --verify --repair {self.path}`, then extract again"
        )

    def verify(self, repair: bool = False) -> dict[str, Any]:
        """Check every chunk of every done video; {"checked": n, "damaged": {video_id: reason}}.

        With `repair`, damaged videos lose their done marker (pending again: `extract` redoes them).
        """
        damaged: dict[str, str] = {}
        done = sorted(self._marked("done"))
        for index in done:
            marker = self._marker(index)
            for view in range(self.shape[1]):
                try:
                    if marker is None:
                        self._read_chunk(index, view, marker)  # an older store: decode it
                    else:
                        problem = self._chunk_problem(index, view, marker)
                        if problem:
                            raise StoreError(self._damaged(index, problem))
                except StoreError as e:
                    damaged[self.video_ids[index]] = str(e)
                    break
        if repair and damaged:
            self._check_writable()
            for video_id in damaged:
                (self._status_dir("done") / str(self.index_of(video_id))).unlink(missing_ok=True)
        return {"checked": len(done), "damaged": damaged, "repaired": bool(repair and damaged)}

    # ---------------------------------------------------------------- summary

    def info(self) -> dict[str, Any]:
        """What is in the store: counts, failures with reasons, fingerprint, shape, codec, size on disk."""
        attrs = self._attrs()
        done = self._marked("done")
        failed = self.failed()
        n, v, t, length, d = self.shape
        return {
            "path": str(self.path),
            "format_version": attrs.get("format_version"),
            "videos": n,
            "done": len(done),
            "failed": failed,
            "pending": n - len(done) - len(failed),
            "fingerprint": attrs["fingerprint"],
            "shape": self.shape_dict,
            "codec": attrs.get("codec"),
            "bytes": _disk_bytes(self.path),
            "raw_bytes_done": len(done) * v * t * length * d * 2,
        }


# -------------------------------------------------------------------- helpers


def is_feature_store(path: str | Path) -> bool:
    """Whether `path` is a store vidcap created: a Zarr group whose attributes hold our format_version
    and fingerprint (read from zarr.json alone, so nothing else is opened or changed)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    return isinstance(attrs, dict) and "format_version" in attrs and "fingerprint" in attrs


def _check_new_store(ids: list[str], dims: tuple[int, ...], codec: str) -> None:
    if len(set(ids)) != len(ids):
        dup = next(v for i, v in enumerate(ids) if v in ids[:i])
        raise ValueError(f"video ids must be unique; {dup!r} appears more than once")
    if any(d <= 0 for d in dims):
        raise ValueError(f"num_views, num_frames, tokens_per_frame, width must be > 0, got {dims}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def _write_empty_store(
    path: Path, ids: list[str], dims: tuple[int, ...], fingerprint: dict[str, Any], codec: str, level: int
) -> None:
    views, frames, length, width = dims
    group = zarr.open_group(path, mode="w-")
    group.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": _jsonable(fingerprint),
            "shape": {
                "videos": len(ids),
                "views": views,
                "frames": frames,
                "tokens_per_frame": length,
                "width": width,
            },
            "codec": {"name": codec, "level": level},
        }
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
        group.create_array(
            "tokens",
            shape=(len(ids), views, frames, length, width),
            chunks=(1, 1, frames, length, width),
            dtype="float16",
            fill_value=0,
            dimension_names=("video", "view", "frame", "token", "channel"),
            **make_codecs(codec, level),
        )
    id_array = group.create_array(
        "video_ids",
        shape=(len(ids),),
        dtype=str,
        chunks=(max(1, min(len(ids), IDS_CHUNK)),),
        dimension_names=("video",),
    )
    if ids:
        id_array[:] = np.array(ids, dtype=str)
    for kind in ("done", "failed"):
        (path / "status" / kind).mkdir(parents=True)


def _check_same_ids(path: str | Path, have: list[str], want: list[str]) -> None:
    if have == want:
        return
    if len(have) != len(want):
        detail = f"the store has {len(have)} videos, the manifest {len(want)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
        detail = f"first difference at index {i}: store {have[i]!r}, manifest {want[i]!r}"
    raise StoreError(
        f"feature store {path} was created for other video ids ({detail}); "
        "use another cache.path or overwrite it"
    )


def _as_float16(tokens: Any) -> np.ndarray:
    if hasattr(tokens, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: cast first)
        tokens = tokens.detach().to("cpu", torch.float16).numpy()
    with np.errstate(over="ignore"):  # overflow becomes inf, which write_video rejects
        return np.ascontiguousarray(tokens, dtype=np.float16)


def _jsonable(obj: dict[str, Any]) -> dict[str, Any]:
    """What the attributes will hold: tuples become lists, paths strings."""
    return json.loads(json.dumps(obj, default=str))


def _disk_bytes(path: Path) -> int:
    total = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
    return total


@contextlib.contextmanager
def _damaged_metadata(path: Path) -> Iterator[None]:
    """A torn or edited `zarr.json` (invalid JSON or metadata) as one StoreError naming the store."""
    try:
        yield
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise StoreError(
            f"{path}: damaged Zarr metadata (a zarr.json that is not valid: {e}); vidcap writes them "
            "atomically, so something else cut or edited it: delete the store and extract again"
        ) from None
