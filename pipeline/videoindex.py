"""What a video file holds, read from one pass over its packets (no frame decoded but the first).

`index_video` opens the container, takes its best video stream (FFmpeg's `av_find_best_stream`)
and demuxes that stream's packets: the frames in presentation order with their times (the
`VideoIndex`), the keyframes a decoder can seek to, the display rotation (from the first
decoded frame), and whether decord's random access would return exactly these frames
(`decord_refusal`). `pipeline/video.py` decodes from it; its docstring states the contract.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from pipeline.errors import VideoDecodeError
from pipeline.sampling import sample_frame_indices

# Where decord's seeking and colours were checked exact against the `pyav` path (tests/test_decode_zoo.py).
DECORD_CODECS = ("h264", "hevc", "vp8", "vp9", "mpeg4")
DECORD_PIX_FMTS = ("yuv420p", "yuvj420p")
DECORD_COLORSPACES = (1, 2, 5, 6)  # AVCOL_SPC_BT709, UNSPECIFIED, BT470BG, SMPTE170M (BT.601)
IDR_NAL_TYPES = {"h264": (5,), "hevc": (19, 20)}  # keyframes a decoder can start from exactly
NO_PTS_FORMATS = ("avi",)  # containers whose packet times are decode times, not presentation times


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    """Average frame rate, num_frames / duration."""
    width: int
    height: int
    """Frame size as displayed (after rotation)."""
    duration: float
    """Seconds: the last frame's presentation time plus its duration."""
    rotation: int = 0
    """Degrees counter-clockwise the display matrix turns the picture: 0, 90, 180 or 270."""
    codec: str = ""
    pix_fmt: str = ""
    variable_rate: bool = False
    """Frame intervals differ by more than 5%: index/fps would not be the time."""
    skipped_frames: int = 0
    """Frames at the start that no decoder shows (corrupt packets, leading pictures of an open GOP
    cut at its keyframe), left out: the video starts at its first decodable frame."""


def frames_at(times: np.ndarray, at: Sequence[float] | np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time in `at`, given the frames' `times` (from
    `frame_times`): the last frame whose time is <= t (frame 0 before the first)."""
    at = np.asarray(at, dtype=np.float64)
    return np.clip(np.searchsorted(times, at + 1e-9, side="right") - 1, 0, len(times) - 1).astype(np.int64)


@dataclass
class VideoIndex:
    """What the probe learns about a file: the frame timeline and how to decode it."""

    path: Path
    info: VideoInfo
    times: np.ndarray  # (N,) float64 seconds after the first frame, non-decreasing
    pts: list[int] | None  # stream pts of each frame in order; None: frames are matched by count
    stream: int  # index of the decoded stream in the container
    coded: tuple[int, int]  # (height, width) as decoded, before rotation
    decord_refusal: str  # why decord is not exact on this file; "" when it may be used
    keys: np.ndarray  # (K,) sorted indices of the keyframes (empty when frames have no pts)
    slot_width: float = field(init=False)

    def __post_init__(self) -> None:
        self.slot_width = self.info.duration / self.info.num_frames

    def key_before(self, frame: int) -> int:
        """The last keyframe at or before `frame` in presentation order (0 if none)."""
        at = int(np.searchsorted(self.keys, frame, side="right")) - 1
        return int(self.keys[at]) if at >= 0 else 0

    def slot_frames(self, slots: np.ndarray) -> np.ndarray:
        """The frame on screen at the middle of each time slot."""
        return frames_at(self.times, (np.asarray(slots) + 0.5) * self.slot_width)

    def sample(
        self,
        num_frames: int,
        mode: str = "uniform",
        rng: np.random.Generator | None = None,
        start_sec: float | None = None,
        end_sec: float | None = None,
    ) -> np.ndarray:
        """The T frame indices (presentation order) of one view: `sample_frame_indices` over the
        time slots in [start_sec, end_sec) (the whole video without them), each slot's frame the
        one on screen at its middle. What `load_clip` decodes."""
        first, stop = self.slot_range(start_sec, end_sec)
        return self.slot_frames(first + sample_frame_indices(stop - first, num_frames, mode, rng))

    def slot_range(self, start_sec: float | None, end_sec: float | None) -> tuple[int, int]:
        """Slots [first, stop) in the time window [start_sec, end_sec); all of them without one."""
        n = self.info.num_frames
        if start_sec is None and end_sec is None:
            return 0, n
        if not self.slot_width > 0:
            raise VideoDecodeError(self.path, "unknown duration: cannot cut a time window")
        start = 0.0 if start_sec is None else float(start_sec)
        end = math.inf if end_sec is None else float(end_sec)
        if start < 0 or end <= start:
            raise ValueError(f"time window [{start_sec}, {end_sec}) is empty or negative")
        first = math.floor(start / self.slot_width + 1e-6)  # the slot under start_sec
        if first >= n:
            raise VideoDecodeError(
                self.path,
                f"window starts at {start:g}s, after the end of the video ({self.info.duration:g}s)",
            )
        stop = n if math.isinf(end) else min(n, max(first + 1, math.ceil(end / self.slot_width - 1e-6)))
        return first, stop


def index_video(path: str | Path) -> VideoIndex:
    """Check the file, then demux its best video stream's packets once: frames, times, keyframes,
    rotation, and whether decord is exact on it. Any failure is a `VideoDecodeError`."""
    path = Path(path)
    _check_file(path)
    with av_errors(path, "not a readable video"), av_open(path) as container:
        # FFmpeg opens still images too, through its `image2` and `*_pipe` demuxers.
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise VideoDecodeError(path, f"a still image ({container.format.name}), not a video")
        if not container.streams.video:
            audio = " (audio only)" if container.streams.audio else ""
            raise VideoDecodeError(path, f"no video stream{audio}")
        stream = container.streams.best("video")
        context = stream.codec_context
        width, height = context.width, context.height
        if width <= 0 or height <= 0:
            raise VideoDecodeError(path, f"invalid frame size {width}x{height}")
        packets = _Packets(stream)
        for packet in container.demux(stream):
            packets.add(packet)
        packets.finish()
        if not packets.stamps:
            raise VideoDecodeError(path, "no frames")
        if packets.rotation is None:
            raise VideoDecodeError(path, f"no decodable frames ({packets.first_error or 'no output'})")
        by_pts = container.format.name not in NO_PTS_FORMATS and None not in packets.stamps
        times, pts, last_duration = _timeline(packets, stream, by_pts)
        skipped = pts.index(packets.first_pts) if pts is not None and packets.first_pts in pts else 0
        if skipped:  # frames before the first one the decoder outputs cannot be shown: not frames
            pts, times = pts[skipped:], times[skipped:] - times[skipped]
        refusal = _decord_refusal(container, stream, packets, pts is not None)
        codec, pix_fmt, stream_index = context.codec.canonical_name, context.pix_fmt or "", stream.index
    rotation = packets.rotation
    duration = float(times[-1] + last_duration)
    intervals = np.diff(times)
    variable = bool(intervals.size > 1 and intervals.max() - intervals.min() > 0.05 * np.median(intervals))
    shown = (width, height) if rotation in (0, 180) else (height, width)
    info = VideoInfo(
        num_frames=len(times), fps=len(times) / duration if duration > 0 else 0.0, width=shown[0],
        height=shown[1], duration=duration, rotation=rotation, codec=codec, pix_fmt=pix_fmt,
        variable_rate=variable, skipped_frames=skipped,
    )  # fmt: skip
    order = {p: k for k, p in enumerate(pts or [])}
    keys = np.array(sorted({order[p] for p in packets.key_stamps if p in order}), dtype=np.int64)
    return VideoIndex(path, info, times, pts, stream_index, (height, width), refusal, keys)


class _Packets:
    """The stream's packets as they are demuxed: times, keyframe cleanliness, the first frame."""

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        self.stream = stream
        self.stamps: list[int | None] = []  # decode order
        self.key_stamps: list[int | None] = []
        self.durations: dict[int | None, int] = {}
        self.dirty_keys = 0  # keyframes a decoder cannot start from exactly (open GOP)
        self.discarded = 0  # packets an edit list hides
        self.rotation: int | None = None
        self.first_pts: int | None = None  # of the first frame the decoder outputs
        self.first_error = ""
        self.nal_length = _nal_length_size(stream.codec_context)

    def add(self, packet: av.Packet) -> None:
        if packet.size == 0:
            return  # the demuxer's final flush packet
        if self.rotation is None:  # the display matrix (and the first shown frame) ride on decoded frames
            self._try_decode(packet)
        if packet.is_discard:  # cut by an edit list: decoded as a reference, never shown
            self.discarded += 1
            return
        stamp = packet.pts if packet.pts is not None else packet.dts
        self.stamps.append(stamp)
        self.durations[stamp] = packet.duration or 0
        if packet.is_keyframe:
            self.key_stamps.append(stamp)
            self.dirty_keys += not self._clean_key(packet)

    def finish(self) -> None:
        if self.rotation is None and self.stamps:
            self._try_decode(None)  # flush: a one-frame video comes out only now

    def _try_decode(self, packet: av.Packet | None) -> None:
        try:
            for frame in self.stream.codec_context.decode(packet):
                self.rotation = int(round((frame.rotation or 0) / 90)) * 90 % 360
                self.first_pts = frame.pts
                break
        except av.FFmpegError as e:  # a corrupt start: keep looking for a decodable frame
            self.first_error = self.first_error or short_error(e)

    def _clean_key(self, packet: av.Packet) -> bool:
        name = self.stream.codec_context.name
        if name not in IDR_NAL_TYPES:
            return True
        if not self.nal_length:
            return False  # Annex B: not checked, not trusted
        return any(t in IDR_NAL_TYPES[name] for t in _nal_types(bytes(packet), self.nal_length, name))


def _timeline(packets: _Packets, stream: av.video.stream.VideoStream, by_pts: bool) -> tuple:
    """(times (N,), pts list or None, the last frame's duration in seconds)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    period = 1 / float(rate) if rate else 0.0
    if not by_pts or len(set(packets.stamps)) < len(packets.stamps):
        # No usable presentation times (AVI, missing or repeated stamps): frame k at k / fps.
        n = len(packets.stamps)
        if period <= 0:
            period = 1 / 25  # FFmpeg's own fallback frame rate
        return np.arange(n) * period, None, period
    pts = sorted(packets.stamps)
    base = float(stream.time_base)
    times = (np.asarray(pts, dtype=np.float64) - pts[0]) * base
    last = packets.durations.get(pts[-1], 0) * base
    if not last > 0:
        last = float(times[-1] - times[-2]) if len(times) > 1 else period
    return times, pts, last


def _decord_refusal(container, stream, packets: _Packets, by_pts: bool) -> str:
    """Why decord's random access would not give exactly the `pyav` frames of this file ("" if it would)."""
    context = stream.codec_context
    if len(container.streams.video) > 1:
        return "several video streams"
    if context.codec.canonical_name not in DECORD_CODECS:
        return f"codec {context.codec.canonical_name}"
    if context.pix_fmt not in DECORD_PIX_FMTS:
        return f"pixel format {context.pix_fmt}"
    if context.colorspace not in DECORD_COLORSPACES:
        return f"colour matrix {context.colorspace} (not BT.601 or BT.709)"
    if not by_pts:
        return f"no presentation times ({container.format.name})"
    if packets.rotation in (90, 270):
        return f"rotated {packets.rotation} degrees (decord's batches of rotated frames fail)"
    if packets.dirty_keys:
        return "open GOP (keyframes that are not IDR)"
    if packets.discarded:
        return "an edit list hides frames"
    if context.name == "mpeg4" and packets.stamps != sorted(packets.stamps):
        return "MPEG-4 with B-frames"
    return ""


def _nal_length_size(context) -> int:
    """Bytes of each NAL length prefix (avcC / hvcC extradata); 0 for Annex B or other codecs."""
    extra = context.extradata or b""
    if context.name == "h264" and len(extra) > 4 and extra[0] == 1:
        return (extra[4] & 3) + 1
    if context.name == "hevc" and len(extra) > 21 and extra[0] == 1:
        return (extra[21] & 3) + 1
    return 0


def _nal_types(data: bytes, length_size: int, codec: str) -> Iterator[int]:
    at = 0
    while at + length_size < len(data):
        size = int.from_bytes(data[at : at + length_size], "big")
        header = data[at + length_size]
        yield header & 0x1F if codec == "h264" else (header >> 1) & 0x3F
        at += length_size + size


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "no such file")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")


def av_open(path: Path):

    return av.open(str(path), mode="r")


@contextlib.contextmanager
def av_errors(path: Path, what: str) -> Iterator[None]:
    """Turn any PyAV/FFmpeg exception into a VideoDecodeError naming the file."""
    try:
        yield
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"{what}: {short_error(e)}") from e


def short_error(error: BaseException, decord: bool = False) -> str:
    """One line of a (possibly very long, multi-line) decoder error message; without decord's
    `[hh:mm:ss] file.cc:line:` prefixes, so that equal failures count as one reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if decord:
        text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)
    return f"{type(error).__name__}: {text[:300]}"
