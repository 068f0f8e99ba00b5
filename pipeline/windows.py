"""A long video cut into windows of a fixed length, decoded once, in order, window after window.

    for window in iter_windows("talk.mp4", num_frames=8, image_size=224, window_s=10.0):
        window.start, window.end, window.frames       # seconds, seconds, (T, S, S, 3) uint8

What `caption.window` captions. Each window gets the frames `load_clip(path, T, S,
start_sec=start, end_sec=end)` gives for it (the frames shown in [start, end), sampled
`uniform`, resized whole to S x S, bicubic), but the file is read once from start to end:

1. the packets are demuxed (no decoding) for the frames' presentation times (pts), which
   decide the windows: frame i is on screen from its pts to the next frame's, and a window
   holds every frame on screen during it; times count from the first frame's pts;
2. the frames are decoded in order with PyAV; a frame some window samples is converted to
   S x S RGB as it goes by, the others are dropped at once;
3. a window is yielded as soon as its last sampled frame is decoded.

So the cost is one decoding pass, linear in the duration (seeking for every window re-decodes
from the previous keyframe, or, without an index, from the start), and memory holds the sampled
frames of the windows in flight (T frames of S x S), whatever the length of the video. PyAV
decodes here whatever `decode.backend` says: it gives the same frames as decord, and reads
sequentially without building an index of the whole file first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.errors import VideoDecodeError
from pipeline.sampling import sample_frame_indices
from pipeline.video import probe_video

_EPS = 1e-6  # seconds: a frame whose pts is a window edge, up to rounding, belongs after the edge


@dataclass
class Window:
    index: int
    """Position of the window in the video (0-based)."""
    count: int
    """Windows in the video."""
    start: float
    """Seconds from the first frame, in ms precision."""
    end: float
    frames: np.ndarray
    """(T, S, S, 3) uint8 RGB: the window's sampled frames."""
    frame_times: np.ndarray
    """(T,) seconds: the pts of each sampled frame, from the first frame."""


def window_spans(duration: float, window: float) -> list[tuple[float, float]]:
    """[start, end) spans of `window` seconds covering `duration`, in milliseconds; the last one may
    be shorter, and a remainder under 1 ms (a duration just past a multiple of the window) is not
    a window of its own."""
    count = max(1, math.ceil((duration - 1e-3) / window))
    edges = [round(min(duration, i * window), 3) for i in range(count)] + [round(duration, 3)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def frame_times(path: str | Path) -> tuple[np.ndarray, float]:
    """(presentation times of the frames in seconds from the first, sorted; the video's duration).

    From demuxed packets, without decoding: the pts of each (or its dts where the container
    stores no pts; or i / fps where it stores neither). The duration ends with the last frame's
    own duration (its packet's, else the frame rate's, else the median gap between frames).
    """
    info = probe_video(path, "pyav")  # the checks every decoder gets (exists, not empty, a video)
    ticks, durations = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            base = stream.time_base or Fraction(1, 1)
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                ticks.append(None if stamp is None else float(stamp * base))
                durations.append(float(packet.duration * base) if packet.duration else 0.0)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"cannot read its packets: {e}") from e
    if not ticks:
        raise VideoDecodeError(path, "no frames")
    if None in ticks:  # no timestamps: a constant frame rate is all there is to go on
        times = np.arange(len(ticks)) / info.fps if info.fps > 0 else np.zeros(len(ticks))
        last = 1 / info.fps if info.fps > 0 else 0.0
    else:
        order = np.argsort(ticks, kind="stable")
        times = np.asarray(ticks)[order]
        last = durations[order[-1]] or (1 / info.fps if info.fps > 0 else 0.0)
        if not last and len(times) > 1:
            last = float(np.median(np.diff(times)))
    times = times - times[0]
    return times, float(times[-1] + last)


def window_plan(times: np.ndarray, spans: list[tuple[float, float]], num_frames: int) -> list[np.ndarray]:
    """Per span, the indices (presentation order) of its T sampled frames: `uniform` over the frames
    on screen during [start, end): from the one showing at `start` to the last starting before `end`."""
    plan = []
    for start, end in spans:
        first = max(0, int(np.searchsorted(times, start + _EPS, side="right")) - 1)
        stop = max(first + 1, int(np.searchsorted(times, end - _EPS, side="left")))
        stop = min(stop, len(times))
        plan.append(first + sample_frame_indices(stop - first, num_frames, "uniform"))
    return plan


def iter_windows(
    path: str | Path, num_frames: int, image_size: int, window_s: float, threads: int = 0
) -> Iterator[Window]:
    """The windows of `window_s` seconds of a video, in order, each with its T sampled frames
    (see the module docstring); decoding the file once. Raises `VideoDecodeError` naming the file
    (and the time it got to) when it cannot be read, after yielding the windows before that."""
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    times, duration = frame_times(path)
    spans = window_spans(duration, window_s)
    plan = window_plan(times, spans, num_frames)
    needed: dict[int, list[int]] = {}  # frame index -> windows sampling it
    for k, indices in enumerate(plan):
        for i in np.unique(indices).tolist():
            needed.setdefault(i, []).append(k)
    kept: dict[int, np.ndarray] = {}  # sampled frames, resized, of the windows not yet yielded
    next_window, decoded = 0, 0
    for i, convert in enumerate(_decoded_frames(Path(path), image_size, threads)):
        decoded = i + 1
        if i in needed:
            kept[i] = convert()
        while next_window < len(plan) and i >= plan[next_window][-1]:
            indices = plan[next_window]
            start, end = spans[next_window]
            yield Window(next_window, len(plan), start, end, np.stack([kept[j] for j in indices.tolist()]),
                         times[indices])  # fmt: skip
            next_window += 1
            for j in [j for j in kept if needed[j][-1] < next_window]:
                del kept[j]
        if next_window == len(plan):
            return
    raise VideoDecodeError(
        path,
        f"only {decoded} of {len(times)} frames could be decoded "
        f"(stopped in window {next_window} of {len(plan)}, at {spans[next_window][0]:g} s)",
    )


def _decoded_frames(path: Path, image_size: int, threads: int) -> Iterator[Callable[[], np.ndarray]]:
    """For each frame in presentation order, a function that gives it as (S, S, 3) uint8 RGB (called
    only for the frames a window samples). Decoder errors become `VideoDecodeError` with the time."""
    seconds = 0.0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if threads > 0:
                stream.codec_context.thread_count = threads
            # size pinned as `pipeline.video` pins it: a mid-stream size change cannot break stacking
            size = (stream.codec_context.width, stream.codec_context.height)
            for frame in container.decode(stream):
                seconds = float(frame.time) if frame.time is not None else seconds
                yield partial(_square_rgb, frame, size, image_size)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"decoding failed near {seconds:.1f} s: {e}") from e


def _square_rgb(frame: av.VideoFrame, size: tuple[int, int], image_size: int) -> np.ndarray:
    """The whole frame resized to S x S, bicubic, as `load_clip`'s evaluation view does."""
    width, height = size
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height)  # (H, W, 3)
    image = Image.fromarray(rgb).resize((image_size, image_size), Image.BICUBIC, box=(0, 0, width, height))
    return np.asarray(image)
