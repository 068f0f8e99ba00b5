"""A long video cut into windows of a fixed length, decoded once, in order, window after window.

    for window in iter_windows("talk.mp4", num_frames=8, image_size=224, window_s=10.0):
        window.start, window.end, window.frames       # seconds, seconds, (T, S, S, 3) uint8

What `caption.window` captions. Each window gets exactly the frames `load_clip(path, T, S,
start_sec=start, end_sec=end)` gives it under `pipeline/video.py`'s contract (time slots of the
pts timeline, `uniform` sampling, the frame on screen at each slot's middle, display rotation,
the whole frame resized to S x S, bicubic), but the file is read once from start to end:

1. `index_video` demuxes the packets (no decoding): the frames' presentation times, which
   place the windows and the frames each one samples;
2. the stream is decoded in order (`iter_frames`: each frame recognised by its pts, by its count
   where the file has none, as in AVI); a frame some window samples is converted to S x S RGB
   as it goes by (`frame_rgb`, then resized), the others are dropped at once;
3. a window is yielded as soon as its last sampled frame is decoded.

So the cost is one decoding pass, linear in the duration, and memory holds the sampled frames
of the windows in flight (T frames of S x S), whatever the length of the video. PyAV decodes
here whatever `decode.backend` says: the contract makes both backends give the same frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.errors import VideoDecodeError
from pipeline.sampling import sample_frame_indices
from pipeline.video import VideoIndex, frame_rgb, index_video, iter_frames


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
    """(T,) seconds: the presentation time of each sampled frame, from the first frame."""


def window_spans(duration: float, window: float) -> list[tuple[float, float]]:
    """[start, end) spans of `window` seconds covering `duration`, in milliseconds; the last one may
    be shorter, and a remainder under 1 ms (a duration just past a multiple of the window) is not
    a window of its own."""
    count = max(1, math.ceil((duration - 1e-3) / window))
    edges = [round(min(duration, i * window), 3) for i in range(count)] + [round(duration, 3)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def window_plan(index: VideoIndex, spans: list[tuple[float, float]], num_frames: int) -> list[np.ndarray]:
    """Per span, the (T,) frames (presentation order) it samples: the time slots the span covers,
    as `load_clip`'s time windows cut them, `uniform` among them, each slot's frame on screen."""
    n, width = index.info.num_frames, index.slot_width
    plan = []
    for start, end in spans:
        first = min(n - 1, math.floor(start / width + 1e-6))
        stop = min(n, max(first + 1, math.ceil(end / width - 1e-6)))
        plan.append(index.slot_frames(first + sample_frame_indices(stop - first, num_frames, "uniform")))
    return plan


def iter_windows(
    path: str | Path, num_frames: int, image_size: int, window_s: float, threads: int = 0
) -> Iterator[Window]:
    """The windows of `window_s` seconds of a video, in order, each with its T sampled frames
    (see the module docstring), decoding the file once. Raises `VideoDecodeError` naming the file
    (and the time) when it cannot be read, after yielding the windows before that."""
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    index = index_video(path)
    spans = window_spans(index.info.duration, window_s)
    plan = window_plan(index, spans, num_frames)
    last_use: dict[int, int] = {}  # frame -> the last window sampling it
    for k, frames in enumerate(plan):
        last_use.update(dict.fromkeys(frames.tolist(), k))
    kept: dict[int, np.ndarray] = {}  # sampled frames, resized, of the windows not yet yielded
    done = 0
    for k, frame in iter_frames(index, threads):
        if k in last_use:
            kept[k] = _square_rgb(frame, index, image_size)
        while done < len(plan) and k >= plan[done][-1]:
            if any(j not in kept for j in plan[done].tolist()):
                break  # a sampled frame that did not decode: reported below
            start, end = spans[done]
            yield Window(done, len(plan), start, end, np.stack([kept[j] for j in plan[done].tolist()]),
                         index.times[plan[done]])  # fmt: skip
            done += 1
            for j in [j for j in kept if last_use[j] < done]:
                del kept[j]
        if done == len(plan):
            return
        if k >= plan[done][-1]:
            break  # a frame of window `done` is missing and will not come: frames come in order
    if done == len(plan):
        return
    lost = [j for j in plan[done].tolist() if j not in kept]
    raise VideoDecodeError(
        index.path,
        f"the frame at {index.times[lost[0]]:.3f}s of window {done + 1}/{len(plan)} could not be decoded",
    )


def _square_rgb(frame: av.VideoFrame, index: VideoIndex, image_size: int) -> np.ndarray:
    """The frame as displayed (`frame_rgb`), resized whole to S x S, bicubic: what `load_clip`'s
    evaluation view does."""
    shown = Image.fromarray(np.ascontiguousarray(frame_rgb(frame, index)))
    return np.asarray(shown.resize((image_size, image_size), Image.BICUBIC, box=(0, 0, *shown.size)))
