"""Video files in and out: probe, decode chosen frames, load one view of a clip, write test videos.

The decoding contract, the same whatever the backend:

* **Stream**: the container's best video stream (FFmpeg's `av_find_best_stream`), the same one
  for probing and decoding, so a file with two video streams is never described by one and
  decoded from the other.
* **Frames and times**: a video is its frames in presentation order, each with its
  presentation time (pts, seconds after the first frame). Count and times come from
  demuxing the stream's packets, not from the header, which often has no frame count
  (Matroska/WebM) or a wrong one (a cut AVI). Frame `i` is the i-th frame in that order. The
  duration is the last frame's pts plus that frame's duration, so a variable-frame-rate
  video has its true length; `fps` is the average, num_frames / duration.
* **Sampling in time**: the duration is cut into `num_frames` (n) equal slots; sampling picks
  slots (`sample_frame_indices`) and each slot gets the frame on screen at the slot's middle.
  At a constant frame rate slot i is frame i, exactly the old index-based sampling; at a
  variable one, uniform sampling is uniform in time. Time windows (`start_sec`, `end_sec`)
  are cut in the same slots.
* **Rotation**: the display matrix (phone videos) is applied, in multiples of 90 degrees;
  `width` and `height` are as displayed.
* **Colour**: FFmpeg's swscale converts to RGB with the frame's own colour matrix and range.

Backends (`backend=`):

* `pyav` (the default and the reference): FFmpeg from PyAV's wheel. It seeks to the keyframe
  before each run of wanted frames and recognises every decoded frame by its pts, so a packet
  that fails to decode loses only its own frames; a wanted frame that never decodes is a
  `VideoDecodeError` naming its time. AVI stores no presentation times: there the k-th frame
  decoded from the start is frame k, and any decode error refuses the file.
* **Undecodable start**: frames before the first one the decoder outputs (corrupt first
  packets; leading pictures of an open GOP cut at its keyframe) are not part of the video
  (`VideoInfo.skipped_frames`); decoding notes it in `fallbacks` as "undecodable frames at the
  start left out", so the stage summaries count it.
* `decord`: random access by seeking, exact only where seeking is. It is used on a file only
  when every check passes: one video stream; H.264/HEVC whose keyframes are all IDR (open-GOP
  keyframes make decord land on the wrong frame), VP8/VP9, or MPEG-4 without B-frames; real
  presentation times (not AVI); 8-bit 4:2:0 with a BT.601, BT.709 or untagged colour matrix
  (its 10-bit colours differ from FFmpeg's); and, once open, decord's frame count, the
  timestamps of the requested frames and the frame size equal the probe's. Otherwise, or when
  decord fails, the frames come from `pyav` and the reason is appended to `fallbacks` (the
  `extract` and `caption` summaries count them under `decode_fallbacks`), never silently.

Any failure to read a video raises `VideoDecodeError` naming the file and the reason, so a
stage can record the video as failed and go on.

One-pass readers of long videos (windows) keep the same contract with `index_video` (the
frames and times, `pipeline/videoindex.py`), `VideoIndex.sample` (a window's frames, as
`load_clip` picks them) and `iter_frames` / `frame_rgb` (every frame once, in order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.errors import VideoDecodeError
from pipeline.sampling import random_resized_crop_params, view_rng
from pipeline.videoindex import VideoIndex, VideoInfo, av_errors, av_open, frames_at, index_video, short_error

__all__ = [  # VideoIndex, VideoInfo, frames_at and index_video live in pipeline.videoindex; part of this API too
    "BACKENDS", "VideoDecodeError", "VideoIndex", "VideoInfo", "decode_frames", "frame_rgb", "frame_times",
    "frames_at", "index_video", "iter_frames", "load_clip", "load_views", "probe_video", "write_video",
]  # fmt: skip

BACKENDS = ("pyav", "decord")
CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mkv": "libx264"}

TIME_TOLERANCE = 1e-3  # seconds: decord's float32 timestamps vs ours

# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def probe_video(path: str | Path, backend: str = "pyav") -> VideoInfo:
    """Frame count, frame rate, displayed size, rotation and duration of a video (the same for
    every backend: they decode the same stream under the same contract)."""
    _check_backend(backend)
    return index_video(path).info


def frame_times(path: str | Path) -> np.ndarray:
    """Presentation time (seconds after the first frame) of every frame, in order: float64 (N,)."""
    return index_video(path).times.copy()


def decode_frames(
    path: str | Path,
    indices: Sequence[int] | np.ndarray,
    backend: str = "pyav",
    threads: int = 0,
    fallbacks: list[str] | None = None,
) -> np.ndarray:
    """Decode frames `indices` (presentation order; any order, repeats allowed): uint8 RGB
    (len(indices), H, W, 3) at the displayed size.

    `threads` is the decoder's thread count (0: automatic). An index past the last frame
    raises `VideoDecodeError`. When `backend="decord"` cannot be trusted on this file the
    frames come from `pyav` and the reason is appended to `fallbacks`.
    """
    _check_backend(backend)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise ValueError(f"frame indices must be >= 0, got {indices.min()}")
    return _gather(index_video(path), indices, backend, threads, fallbacks)


def load_clip(
    path: str | Path,
    num_frames: int,
    image_size: int,
    view: int = 0,
    seed: int = 0,
    video_id: str = "",
    backend: str = "pyav",
    threads: int = 0,
    start_sec: float | None = None,
    end_sec: float | None = None,
    fallbacks: list[str] | None = None,
) -> np.ndarray:
    """One view of a video as uint8 RGB frames (num_frames, image_size, image_size, 3).

    View 0 (evaluation): `uniform` time slots, each whole frame resized to S x S with
    bicubic interpolation, no crop (as BLIP-2's image processor does).
    View v >= 1 (training): `headtail` slots, then one random resized crop (scale
    0.5-1.0) and one horizontal flip (p=0.5) shared by all frames, then resize to S x S.
    Its randomness is `view_rng(seed, video_id, view)`, drawn in this order: slots, crop,
    flip; so the same arguments give the same clip everywhere.

    `start_sec` / `end_sec` restrict sampling to the slots in [start_sec, end_sec);
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
        fallbacks=fallbacks,
    )[0]


def load_views(
    path: str | Path,
    num_frames: int,
    image_size: int,
    views: Sequence[int] = (0,),
    seed: int = 0,
    video_id: str = "",
    backend: str = "pyav",
    threads: int = 0,
    start_sec: float | None = None,
    end_sec: float | None = None,
    fallbacks: list[str] | None = None,
) -> np.ndarray:
    """Several views of one video, uint8 (V, T, S, S, 3): `load_clip` of each view, but the
    video is probed once and every frame that any view needs is decoded once."""
    _check_backend(backend)
    if len(views) == 0 or min(views) < 0:
        raise ValueError(f"views must be a non-empty list of integers >= 0, got {list(views)}")
    rngs = [view_rng(seed, video_id, view) if view > 0 else None for view in views]
    index = index_video(path)
    wanted = []  # V x (T,) frame indices
    for rng in rngs:
        mode = "uniform" if rng is None else "headtail"
        wanted.append(index.sample(num_frames, mode, rng, start_sec, end_sec))
    unique, inverse = np.unique(np.concatenate(wanted), return_inverse=True)
    frames = _gather(index, unique, backend, threads, fallbacks)  # (U, H, W, 3)
    rows = inverse.reshape(len(views), num_frames)  # (V, T) positions in `frames`
    return np.stack([_augment(frames, row, image_size, rng) for row, rng in zip(rows, rngs, strict=True)])


def iter_frames(index: VideoIndex, threads: int = 0) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, decoded frame) of every decodable frame of an indexed video (`index_video`),
    in presentation order, decoding the file once from the start; for one-pass readers of long
    videos (`frame_rgb` converts a frame). Frames are recognised by pts (by count where the
    file has none: there a packet that fails to decode is a `VideoDecodeError`); a frame whose
    packet fails to decode is left out."""
    position = {p: k for k, p in enumerate(index.pts)} if index.pts is not None else None
    with av_errors(index.path, "decoding failed"), av_open(index.path) as container:
        stream = container.streams[index.stream]
        stream.thread_type = "AUTO"
        if threads > 0:
            stream.codec_context.thread_count = threads
        for count, frame in enumerate(_frames(index.path, container, stream, [], strict=position is None)):
            k = count if position is None else position.get(frame.pts, -1)
            if k >= 0:
                yield k, frame


def frame_rgb(frame: av.VideoFrame, index: VideoIndex) -> np.ndarray:
    """A frame of `iter_frames` as displayed: uint8 RGB (H, W, 3), FFmpeg's colour conversion,
    the display rotation applied (what `decode_frames` returns)."""
    height, width = index.coded
    return _rgb(frame, width, height, index.info.rotation)


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
# Decoding: pyav (reference), decord (verified, else fallback)
# ---------------------------------------------------------------------------------------


class _Inexact(Exception):
    """decord would not return exactly the requested frames of this file."""


def _gather(
    index: VideoIndex, indices: np.ndarray, backend: str, threads: int, fallbacks: list[str] | None
) -> np.ndarray:
    """Frames at `indices` (any order, repeats): each distinct frame is decoded once."""
    if indices.size == 0:
        return np.empty((0, index.info.height, index.info.width, 3), dtype=np.uint8)
    unique, inverse = np.unique(indices, return_inverse=True)
    if unique[-1] >= index.info.num_frames:
        raise VideoDecodeError(
            index.path, f"frame {unique[-1]} asked for, but the video has {index.info.num_frames} frames"
        )
    if index.info.skipped_frames and fallbacks is not None:
        fallbacks.append("undecodable frames at the start left out")
    frames = None
    if backend == "decord":
        try:
            frames = _decord_frames(index, unique, threads)
        except _Inexact as e:
            if fallbacks is not None:
                fallbacks.append(f"decord: {e}")
    if frames is None:
        frames = _pyav_frames(index, unique, threads)  # (U, H, W, 3)
    return np.ascontiguousarray(frames[inverse], dtype=np.uint8)


def _pyav_frames(index: VideoIndex, unique: np.ndarray, threads: int) -> np.ndarray:
    """The wanted frames, recognised by pts: first by seeking to the keyframe before each group of
    them, then, for any still missing, by the reference (decoding in order from the start)."""
    frames: dict[int, np.ndarray] = {}
    errors: list[str] = []
    if index.pts is not None and len(index.keys) > 1:
        _decode(index, unique.tolist(), threads, frames, errors, seek=True)
    missing = sorted(set(unique.tolist()) - frames.keys())
    if missing:
        _decode(index, missing, threads, frames, errors, seek=False)
    missing = sorted(set(unique.tolist()) - frames.keys())
    if missing:
        times = ", ".join(f"{index.times[k]:.3f}s" for k in missing[:5])
        cause = f" ({errors[0]})" if errors else ""
        raise VideoDecodeError(
            index.path, f"{len(missing)} requested frame(s) could not be decoded, at {times}{cause}"
        )
    return np.stack([frames[k] for k in unique.tolist()])


def _decode(
    index: VideoIndex,
    wanted: list[int],
    threads: int,
    frames: dict[int, np.ndarray],
    errors: list[str],
    seek: bool,
) -> None:
    """Decode the `wanted` frames (sorted) into `frames`. Frames are recognised by pts (by their
    count from the start where the file has none). With `seek`, each run of wanted frames after
    a keyframe the decoder has not reached yet starts with a seek to that keyframe, and only
    frames at or after it are taken: frames before a keyframe in presentation order may need
    pictures the seek skipped (open GOP)."""
    position = {p: k for k, p in enumerate(index.pts)} if index.pts is not None else None
    height, width = index.coded  # pinned: a mid-stream size change cannot break stacking
    with av_errors(index.path, "decoding failed"), av_open(index.path) as container:
        stream = container.streams[index.stream]
        stream.thread_type = "AUTO"
        if threads > 0:
            stream.codec_context.thread_count = threads
        todo, floor, reached = list(wanted), None, -1  # reached: the last frame decoded
        while todo:
            if seek:
                key = index.key_before(todo[0])
                if key > max(reached, 0):  # skip the frames in between (none before the first key)
                    container.seek(index.pts[key], stream=stream, backward=True)
                    floor, reached = key, key - 1
            count = 0
            for frame in _frames(index.path, container, stream, errors, strict=position is None):
                k = count if position is None else position.get(frame.pts, -1)
                count += 1
                if k < 0 or (floor is not None and k < floor):
                    continue
                reached = max(reached, k)
                if k in todo:
                    frames[k] = _rgb(frame, width, height, index.info.rotation)
                    todo.remove(k)
                while todo and todo[0] < k:  # passed without coming out: left to the pass from the start
                    todo.pop(0)
                if not todo or (seek and index.key_before(todo[0]) > reached):
                    break
            else:
                return  # the end of the stream: what is still in `todo` cannot be decoded


def _frames(path: Path, container, stream, errors: list[str], strict: bool) -> Iterator[av.VideoFrame]:
    """The stream's decoded frames from where the container is; a packet that fails to decode is
    skipped and its error kept (refused when `strict`: without pts, later frames cannot be placed)."""
    for packet in container.demux(stream):
        try:
            decoded = packet.decode()
        except av.FFmpegError as e:
            if strict:
                raise VideoDecodeError(
                    path, f"a packet cannot be decoded ({short_error(e)}) and the file has no "
                    "presentation times to tell which frames follow"
                ) from e  # fmt: skip
            errors.append(short_error(e))
            continue
        yield from decoded


def _rgb(frame: av.VideoFrame, width: int, height: int, rotation: int) -> np.ndarray:
    """FFmpeg's RGB conversion (the frame's own colour matrix), then the display rotation."""
    image = frame.to_ndarray(format="rgb24", width=width, height=height)
    return np.rot90(image, k=rotation // 90) if rotation else image


def _decord_frames(index: VideoIndex, unique: np.ndarray, threads: int) -> np.ndarray:
    """decord's frames, after checking they are the ones the contract asks for; else `_Inexact`."""
    if index.decord_refusal:
        raise _Inexact(index.decord_refusal)
    try:  # deferred: decord is optional (wheels exist for x86-64 only)
        from decord import VideoReader, cpu
    except ImportError as e:
        raise _Inexact("decord is not installed") from e
    try:
        reader = VideoReader(str(index.path), ctx=cpu(0), num_threads=threads)
    except Exception as e:
        raise _Inexact(f"cannot open it ({short_error(e, decord=True)})") from e
    try:
        if len(reader) != index.info.num_frames:
            raise _Inexact("its frame count differs from the stream's")
        stamps = reader.get_frame_timestamp([0, *unique.tolist()])[:, 0].astype(np.float64)
        if np.abs((stamps[1:] - stamps[0]) - index.times[unique]).max() > TIME_TOLERANCE:
            raise _Inexact("its frame times differ from the stream's")
        batch = reader.get_batch(unique.tolist())
        batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # any decord bridge
    except _Inexact:
        raise
    except Exception as e:
        raise _Inexact(f"failed ({short_error(e, decord=True)})") from e
    finally:
        del reader  # decord leaks memory when readers linger
    if batch.shape[1:3] != (index.info.height, index.info.width):
        raise _Inexact("its frame size differs from the stream's")
    return batch


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose from {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


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
