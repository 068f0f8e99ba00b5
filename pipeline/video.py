"""Video files in and out: probe, decode chosen frames, load one view of a clip, write test videos.

Two decoders sit behind one interface (`backend=`):

* `decord`: `VideoReader(...).get_batch(indices)`, fast random access. It is unmaintained
  and can crash or hang on garbage, so every file first passes a cheap PyAV header probe
  (exists, not empty, has a video stream, is not a still image) before decord sees it.
* `pyav`: FFmpeg from PyAV's wheel, maintained. Frames are decoded in order and the
  wanted ones kept. Containers often store no frame count (`stream.frames` is 0 for
  Matroska/WebM) or a wrong one (the header of a truncated AVI), so the count comes from
  demuxing the packets, which is what decord's index does too. There is no seeking: a
  frame late in a long video costs decoding everything before it.

Both return the same RGB frames for the same indices. Frame `i` is the i-th frame in
presentation order; a time `t` maps to frame `floor(t * fps)` (constant frame rate assumed).
Any failure to read a video raises `VideoDecodeError` naming the file and the reason, so a
stage can record the video as failed and go on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.errors import VideoDecodeError
from pipeline.sampling import random_resized_crop_params, sample_frame_indices, view_rng

BACKENDS = ("decord", "pyav")
CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mkv": "libx264"}


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    """Seconds: num_frames / fps when the frame rate is known, else the container's duration."""


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def probe_video(path: str | Path, backend: str = "decord") -> VideoInfo:
    """Frame count, frame rate, size and duration of a video, as the chosen backend sees it."""
    with _open_video(path, backend, threads=1) as video:
        return video.info


def decode_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray, backend: str = "decord", threads: int = 0
) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed): uint8 RGB (len(indices), H, W, 3).

    Frames keep their native resolution. `threads` is the decoder's thread count (0: automatic).
    An index past the last decodable frame raises `VideoDecodeError`.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise ValueError(f"frame indices must be >= 0, got {indices.min()}")
    with _open_video(path, backend, threads) as video:
        return _gather(video, indices)


def load_clip(
    path: str | Path,
    num_frames: int,
    image_size: int,
    view: int = 0,
    seed: int = 0,
    video_id: str = "",
    backend: str = "decord",
    threads: int = 0,
    start_sec: float | None = None,
    end_sec: float | None = None,
) -> np.ndarray:
    """One view of a video as uint8 RGB frames (num_frames, image_size, image_size, 3).

    View 0 (evaluation): `uniform` frame indices, each whole frame resized to S x S with
    bicubic interpolation, no crop (as BLIP-2's image processor does).
    View v >= 1 (training): `headtail` indices, then one random resized crop (scale
    0.5-1.0) and one horizontal flip (p=0.5) shared by all frames, then resize to S x S.
    Its randomness is `view_rng(seed, video_id, view)`, drawn in this order: indices, crop,
    flip; so the same arguments give the same clip everywhere.

    `start_sec` / `end_sec` restrict sampling to the frames shown in [start_sec, end_sec);
    always exactly `num_frames` frames come back (short spans repeat frames).
    """
    return load_views(
        path,
        num_frames,
        image_size,
        [view],
        seed=seed,
        video_id=video_id,
        backend=backend,
        threads=threads,
        start_sec=start_sec,
        end_sec=end_sec,
    )[0]


def load_views(
    path: str | Path,
    num_frames: int,
    image_size: int,
    views: Sequence[int] = (0,),
    seed: int = 0,
    video_id: str = "",
    backend: str = "decord",
    threads: int = 0,
    start_sec: float | None = None,
    end_sec: float | None = None,
) -> np.ndarray:
    """Several views of one video, uint8 (V, T, S, S, 3): `load_clip` of each view, but the
    video is opened once and every frame that any view needs is decoded once."""
    if len(views) == 0 or min(views) < 0:
        raise ValueError(f"views must be a non-empty list of integers >= 0, got {list(views)}")
    rngs = [view_rng(seed, video_id, view) if view > 0 else None for view in views]
    with _open_video(path, backend, threads) as video:
        first, stop = _window(video, start_sec, end_sec)
        indices = []  # V x (T,)
        for rng in rngs:
            mode = "uniform" if rng is None else "headtail"
            indices.append(first + sample_frame_indices(stop - first, num_frames, mode, rng))
        unique, inverse = np.unique(np.concatenate(indices), return_inverse=True)
        frames = _gather(video, unique)  # (U, H, W, 3)
    rows = inverse.reshape(len(views), num_frames)  # (V, T) positions in `frames`
    return np.stack([_augment(frames, row, image_size, rng) for row, rng in zip(rows, rngs, strict=True)])


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8, codec: str | None = None) -> None:
    """Encode uint8 RGB frames (N, H, W, 3) into a real video file with PyAV.

    The codec defaults by extension: H.264 for .mp4/.mkv, VP9 for .webm, MPEG-4 for .avi.
    Odd sizes are allowed for codecs that take them (yuv444p is used for H.264 then).
    N = 0 writes a container with no frames (a broken video, for tests).
    """

    path = Path(path)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    codec = codec or CODECS.get(path.suffix.lower(), "libx264")
    height, width = frames.shape[1:3]
    odd = height % 2 or width % 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        # PyAV wants a rational rate: a float such as 29.97 raises.
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if (odd and codec == "libx264") else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "18"}
        elif codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}  # ~15x faster than the default
        # Without frames PyAV never writes the header and leaves no file at all.
        container.start_encoding()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------


@dataclass
class _Header:
    """What PyAV reads from the container header alone, without decoding."""

    width: int
    height: int
    fps: float
    duration: float


class _DecordVideo:
    def __init__(self, path: Path, header: _Header, threads: int) -> None:
        try:
            from decord import VideoReader, cpu
        except ImportError as e:
            raise ImportError(
                "decord is not installed (wheels exist for x86-64 only): use backend 'pyav'"
            ) from e

        self.path, self.header = path, header
        try:
            self.reader = VideoReader(str(path), ctx=cpu(0), num_threads=threads)
            num_frames, fps = len(self.reader), float(self.reader.get_avg_fps())
        except Exception as e:
            raise VideoDecodeError(path, f"decord cannot open it: {_short(e)}") from e
        if num_frames < 1:
            raise VideoDecodeError(path, "no frames")
        self.info = _info(num_frames, fps, header)

    def get(self, unique: np.ndarray) -> np.ndarray:
        if unique[-1] >= self.info.num_frames:
            raise VideoDecodeError(
                self.path, f"frame {unique[-1]} asked for, but the video has {self.info.num_frames} frames"
            )
        try:
            batch = self.reader.get_batch(unique.tolist())
            batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # any decord bridge
        except Exception as e:
            raise VideoDecodeError(self.path, f"decord failed to decode: {_short(e)}") from e
        return batch

    def close(self) -> None:
        del self.reader  # decord leaks memory when readers linger


class _PyAVVideo:
    def __init__(self, path: Path, header: _Header, threads: int) -> None:
        self.path, self.header, self.threads = path, header, threads
        self._info: VideoInfo | None = None

    @property
    def info(self) -> VideoInfo:
        if self._info is None:
            with _av_errors(self.path, "cannot count frames"), _av_open(self.path) as container:
                stream = container.streams.video[0]
                num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            if num_frames < 1:
                raise VideoDecodeError(self.path, "no frames")
            self._info = _info(num_frames, self.header.fps, self.header)
        return self._info

    def get(self, unique: np.ndarray) -> np.ndarray:
        wanted, last = set(unique.tolist()), int(unique[-1])
        frames, count = {}, 0
        with _av_errors(self.path, "decoding failed"), _av_open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.threads > 0:
                stream.codec_context.thread_count = self.threads
            size = {"width": self.header.width, "height": self.header.height}
            for frame in container.decode(stream):
                if count in wanted:  # size pinned so a mid-stream size change cannot break stacking
                    frames[count] = frame.to_ndarray(format="rgb24", **size)
                count += 1
                if count > last:
                    break
        if count == 0:
            raise VideoDecodeError(self.path, "no frames")
        if count <= last:
            raise VideoDecodeError(
                self.path, f"frame {last} asked for, but only {count} frames could be decoded"
            )
        return np.stack([frames[i] for i in unique.tolist()])

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _open_video(path: str | Path, backend: str, threads: int) -> Iterator[_DecordVideo | _PyAVVideo]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose from {', '.join(BACKENDS)}")
    path = Path(path)
    header = _probe_header(path)
    video = (_DecordVideo if backend == "decord" else _PyAVVideo)(path, header, threads)
    try:
        yield video
    finally:
        video.close()


def _probe_header(path: Path) -> _Header:
    """Cheap checks before any decoder runs: the file exists, is not empty, holds a video."""
    if not path.exists():
        raise VideoDecodeError(path, "no such file")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    with _av_errors(path, "not a readable video"), _av_open(path) as container:
        # FFmpeg opens still images too, through its `image2` and `*_pipe` demuxers.
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise VideoDecodeError(path, f"a still image ({container.format.name}), not a video")
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoDecodeError(path, f"invalid frame size {width}x{height}")
        # FFmpeg learns the pixel format by decoding the first frames; none means no frame
        # decodes (decord then fails deep inside its filter graph).
        if stream.codec_context.pix_fmt is None:
            raise VideoDecodeError(path, "no decodable frames (unknown pixel format)")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration = container.duration / 1_000_000 if container.duration else 0.0
    return _Header(width=width, height=height, fps=fps, duration=duration)


def _av_open(path: Path):

    return av.open(str(path), mode="r")


@contextlib.contextmanager
def _av_errors(path: Path, what: str) -> Iterator[None]:
    """Turn any PyAV/FFmpeg exception into a VideoDecodeError naming the file."""
    try:
        yield
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"{what}: {_short(e)}") from e


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _info(num_frames: int, fps: float, header: _Header) -> VideoInfo:
    if not (fps > 0 and math.isfinite(fps)):
        fps = num_frames / header.duration if header.duration > 0 else 0.0
    duration = num_frames / fps if fps > 0 else header.duration
    return VideoInfo(
        num_frames=num_frames, fps=fps, width=header.width, height=header.height, duration=duration
    )


def _gather(video: _DecordVideo | _PyAVVideo, indices: np.ndarray) -> np.ndarray:
    """Frames at `indices` (any order, repeats): each distinct frame is decoded once."""
    if indices.size == 0:
        return np.empty((0, video.header.height, video.header.width, 3), dtype=np.uint8)
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = video.get(unique)  # (U, H, W, 3)
    return np.ascontiguousarray(frames[inverse], dtype=np.uint8)


def _window(
    video: _DecordVideo | _PyAVVideo, start_sec: float | None, end_sec: float | None
) -> tuple[int, int]:
    """Frames [first, stop) shown in the time window; the whole video without one."""
    n = video.info.num_frames
    if start_sec is None and end_sec is None:
        return 0, n
    fps = video.info.fps
    if fps <= 0:
        raise VideoDecodeError(video.path, "unknown frame rate: cannot cut a time window")
    start = 0.0 if start_sec is None else float(start_sec)
    end = math.inf if end_sec is None else float(end_sec)
    if start < 0 or end <= start:
        raise ValueError(f"time window [{start_sec}, {end_sec}) is empty or negative")
    first = math.floor(start * fps + 1e-6)  # the frame on screen at start_sec
    if first >= n:
        raise VideoDecodeError(
            video.path, f"window starts at {start:g}s, after the end of the video ({video.info.duration:g}s)"
        )
    stop = n if math.isinf(end) else min(n, max(first + 1, math.ceil(end * fps - 1e-6)))
    return first, stop


def _augment(frames: np.ndarray, row: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """The clip frames[row] of one view: crop and flip drawn from `rng` (none for view 0), resize."""
    height, width = frames.shape[1:3]
    if rng is None:
        top, left, h, w, flip = 0, 0, height, width, False
    else:
        top, left, h, w = random_resized_crop_params(height, width, rng)
        flip = bool(rng.random() < 0.5)
    unique, inverse = np.unique(row, return_inverse=True)
    clip = _resize(frames[unique], size, box=(left, top, left + w, top + h))[inverse]  # (T, S, S, 3)
    return np.ascontiguousarray(clip[:, :, ::-1] if flip else clip)


def _resize(frames: np.ndarray, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop each frame to `box` (left, top, right, bottom) and resize it to size x size, bicubic."""

    return np.stack(
        [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC, box=box)) for f in frames]
    )


def _short(error: BaseException) -> str:
    """One line of a (possibly very long, multi-line) decoder error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"
