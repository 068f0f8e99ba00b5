"""A zoo of real-world video files, encoded here with PyAV (no downloads), for decoder tests.

Each file stands for a kind of file users have and that decoders get wrong: BT.709-tagged H.264
(HD footage: the colour matrix must follow the tag), H.264 in AVI with
B-frames, open-GOP H.264 and HEVC, 10-bit HEVC, AV1, variable-frame-rate VP8/VP9 WebM, an MP4
with two video streams of different sizes and rates, phone videos rotated by their display
matrix (MP4 and MOV), an MP4 cut with an edit list, an audio-only file and a file whose first
packets are corrupt.

Every frame shows its own index: the top half is 8 vertical bars, black or white, the bits
of the index (least significant on the left); the bottom half is one colour (`BOTTOM`). So
`frame_index(image)` tells which frame came back and a wrong rotation or flip is visible.

    from pipeline.demo.videozoo import make_video_zoo
    zoo = make_video_zoo("/tmp/zoo")   # {name: ZooVideo}; ZOO_SKIPPED says what could not be made

`ZooVideo.decord` is what `backend="decord"` must do with the file: "" (decord is exact there
and used) or the start of the fallback reason; `ZooVideo.refused` is the start of the
`VideoDecodeError` reason for files no backend can decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BOTTOM = (200, 40, 40)  # the colour of every frame's lower half
WIDTH, HEIGHT = 64, 48


@dataclass(frozen=True)
class ZooVideo:
    name: str
    num_frames: int  # frames in the decoded stream
    duration: float  # seconds, from the timestamps
    width: int  # as displayed
    height: int
    rotation: int = 0
    decord: str = ""  # "" = decord must be used; else the fallback reason starts with this
    refused: str = ""  # the VideoDecodeError reason starts with this (every backend)
    first_shown: int = 0  # the index frame 0 shows (an edit list or a corrupt start hides the ones before)
    skipped: int = 0  # frames at the start no decoder can show (corrupt start), left out


def index_frames(n: int, width: int = WIDTH, height: int = HEIGHT, offset: int = 0) -> np.ndarray:
    """uint8 RGB (n, height, width, 3): frame i shows i + offset in 8 black/white bars over `BOTTOM`."""
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    frames[:, height // 2 :] = BOTTOM
    bar = width // 8
    for i in range(n):
        for b in range(8):
            frames[i, : height // 2, b * bar : (b + 1) * bar] = 255 if ((i + offset) >> b) & 1 else 0
    return frames


def frame_index(image: np.ndarray, rotation: int = 0) -> int:
    """The index an upright zoo frame shows (`rotation`: how the image was turned for display);
    -1 if the image is not one (wrong orientation, wrong stream, garbage)."""
    image = np.rot90(image, k=-(rotation // 90)).astype(np.float64)
    height, width = image.shape[:2]
    top, bottom = image[: height // 2 - 2], image[height // 2 + 2 :]
    if np.abs(bottom.mean(axis=(0, 1)) - BOTTOM).max() > 24:
        return -1
    bar, value = width // 8, 0
    for b in range(8):
        level = top[:, b * bar + 2 : (b + 1) * bar - 2].mean()
        if 40 < level < 215:
            return -1
        value |= int(level > 127) << b
    return value


def make_video_zoo(folder: str | Path, names: list[str] | None = None) -> dict[str, ZooVideo]:
    """Write the zoo (or the named files) into `folder`; returns what was written, by name.
    Files whose encoder this FFmpeg lacks are left out, with the reason in `ZOO_SKIPPED`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (make, video) in _ZOO.items():
        if names is not None and name not in names:
            continue
        if name in ZOO_SKIPPED:
            continue
        path = folder / name
        if not path.exists():
            make(path)
        written[name] = video
    return written


# ---------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------


def _encode(
    path: Path, codec: str, frames: np.ndarray, times_ms: list[int] | None = None, rate: Fraction = Fraction(25),
    options: dict[str, str] | None = None, pix_fmt: str = "yuv420p", rotation: int = 0, colorspace: int = 0,
) -> None:  # fmt: skip
    """Encode `frames`; with `times_ms`, frame i is shown at times_ms[i] (variable frame rate);
    `colorspace` (an AVColorSpace, 1 = BT.709) converts and tags the frames with that matrix."""
    with av.open(str(path), mode="w") as container:
        stream = _add_video(container, codec, frames.shape[2], frames.shape[1], rate, options, pix_fmt)
        if rotation:
            stream.set_display_rotation(rotation)
        if colorspace:
            context = stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = colorspace
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if colorspace:
                frame = frame.reformat(format=pix_fmt, dst_colorspace=colorspace)
                frame.colorspace = colorspace
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _add_video(container, codec, width, height, rate, options, pix_fmt):
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.options = dict(options or {})
    return stream


def _x264(**extra: str) -> dict[str, str]:
    return {"preset": "veryfast", "crf": "18", "bf": "3", "g": "12", **extra}


def _x265(params: str = "") -> dict[str, str]:
    return {"preset": "ultrafast", "crf": "18", "x265-params": f"keyint=12:bframes=3:log-level=error{params}"}


def _two_streams(path: Path) -> None:
    """320x180-like at 25 fps and 480x270-like at 29.97 fps, 2 s each; the second shows index + 100."""
    small, large = index_frames(50, 64, 36), index_frames(60, 96, 54, offset=100)
    with av.open(str(path), mode="w") as container:
        a = _add_video(container, "libx264", 64, 36, Fraction(25), _x264(), "yuv420p")
        b = _add_video(container, "libx264", 96, 54, Fraction(30000, 1001), _x264(), "yuv420p")
        for i in range(60):
            if i < 50:
                container.mux(a.encode(av.VideoFrame.from_ndarray(small[i], format="rgb24")))
            container.mux(b.encode(av.VideoFrame.from_ndarray(large[i], format="rgb24")))
        container.mux(a.encode())
        container.mux(b.encode())


def _audio_only(path: Path) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        tone = np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000).astype(np.float32)[None]  # (1, S)
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp",
                                               layout="mono")  # fmt: skip
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _corrupt_start(path: Path) -> None:
    """H.264 (keyframe every 10 frames) whose first 3 packets are overwritten with noise."""
    _encode(
        path, "libx264", index_frames(40), options=_x264(g="10", bf="2", keyint_min="10", sc_threshold="0")
    )
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        spans = [(p.pos, p.size) for p in container.demux(stream) if p.size][:3]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos, size in spans:
        data[pos + 4 : pos + size] = rng.integers(
            0, 256, size - 4, dtype=np.uint8
        ).tobytes()  # keep NAL lengths
    path.write_bytes(bytes(data))


def _edit_list(path: Path) -> None:
    """H.264 MP4 whose first 5 encoded frames have negative times: the muxer writes an edit list
    that hides them, as a cut without re-encoding (`ffmpeg -ss 0.2 -c copy`) does."""
    with av.open(str(path), mode="w") as container:
        stream = _add_video(container, "libx264", WIDTH, HEIGHT, Fraction(25), _x264(), "yuv420p")
        stream.codec_context.time_base = Fraction(1, 25)
        for i, image in enumerate(index_frames(N)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i - 5, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _vfr_times(fast: int, slow: int) -> list[int]:
    """`fast` frames at 30 fps, then `slow` frames at 10 fps, in milliseconds."""
    return [round(i * 1000 / 30) for i in range(fast)] + [
        round(fast * 1000 / 30) + 100 * i for i in range(slow)
    ]


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


N = 36  # frames of most zoo files (25 fps: 1.44 s)
VFR_FAST, VFR_SLOW = 30, 15  # 1 s at 30 fps, then 1.5 s at 10 fps: 45 frames, 2.5 s
ZOO_SKIPPED: dict[str, str] = {}

_ZOO: dict[str, tuple[Callable[[Path], None], ZooVideo]] = {
    "h264.mp4": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264()),
        ZooVideo("h264.mp4", N, N / 25, WIDTH, HEIGHT),
    ),
    "h264_bt709.mp4": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264(), colorspace=1),
        ZooVideo("h264_bt709.mp4", N, N / 25, WIDTH, HEIGHT),
    ),
    "h264_bframes.avi": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264()),
        ZooVideo("h264_bframes.avi", N, N / 25, WIDTH, HEIGHT, decord="no presentation times"),
    ),
    "h264_open_gop.mp4": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264(**{"x264-params": "open-gop=1"})),
        ZooVideo("h264_open_gop.mp4", N, N / 25, WIDTH, HEIGHT, decord="open GOP"),
    ),
    "hevc.mp4": (
        lambda p: _encode(p, "libx265", index_frames(N), options=_x265()),
        ZooVideo("hevc.mp4", N, N / 25, WIDTH, HEIGHT, decord="open GOP"),
    ),
    "hevc_closed_gop.mp4": (
        lambda p: _encode(p, "libx265", index_frames(N), options=_x265(":open-gop=0")),
        ZooVideo("hevc_closed_gop.mp4", N, N / 25, WIDTH, HEIGHT),
    ),
    "hevc10.mkv": (
        lambda p: _encode(p, "libx265", index_frames(N), options=_x265(":open-gop=0"), pix_fmt="yuv420p10le"),
        ZooVideo("hevc10.mkv", N, N / 25, WIDTH, HEIGHT, decord="pixel format yuv420p10le"),
    ),
    "av1.mkv": (
        lambda p: _encode(
            p, "libsvtav1", index_frames(N), options={"preset": "12", "svtav1-params": "keyint=12"}
        ),
        ZooVideo("av1.mkv", N, N / 25, WIDTH, HEIGHT, decord="codec av1"),
    ),
    "vfr_vp8.webm": (
        lambda p: _encode(
            p,
            "libvpx",
            index_frames(VFR_FAST + VFR_SLOW),
            _vfr_times(VFR_FAST, VFR_SLOW),
            rate=Fraction(10),
            options={"deadline": "realtime", "cpu-used": "8", "g": "12"},
        ),  # fmt: skip
        ZooVideo("vfr_vp8.webm", VFR_FAST + VFR_SLOW, 2.5, WIDTH, HEIGHT),
    ),
    "vfr_vp9.webm": (
        lambda p: _encode(
            p,
            "libvpx-vp9",
            index_frames(VFR_FAST + VFR_SLOW),
            _vfr_times(VFR_FAST, VFR_SLOW),
            rate=Fraction(10),
            options={"deadline": "realtime", "cpu-used": "8", "g": "12"},
        ),  # fmt: skip
        ZooVideo("vfr_vp9.webm", VFR_FAST + VFR_SLOW, 2.5, WIDTH, HEIGHT),
    ),
    "two_streams.mp4": (
        _two_streams,
        ZooVideo("two_streams.mp4", 50, 2.0, 64, 36, decord="several video streams"),
    ),
    "rot90.mp4": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264(), rotation=90),
        ZooVideo("rot90.mp4", N, N / 25, HEIGHT, WIDTH, rotation=90, decord="rotated 90"),
    ),
    "rot180.mov": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264(), rotation=180),
        ZooVideo("rot180.mov", N, N / 25, WIDTH, HEIGHT, rotation=180),
    ),
    "rot270.mp4": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264(), rotation=270),
        ZooVideo("rot270.mp4", N, N / 25, HEIGHT, WIDTH, rotation=270, decord="rotated 270"),
    ),
    "rot90.mov": (
        lambda p: _encode(p, "libx264", index_frames(N), options=_x264(), rotation=90),
        ZooVideo("rot90.mov", N, N / 25, HEIGHT, WIDTH, rotation=90, decord="rotated 90"),
    ),
    "edit_list.mp4": (
        _edit_list,
        ZooVideo(
            "edit_list.mp4",
            N - 5,
            (N - 5) / 25,
            WIDTH,
            HEIGHT,
            decord="an edit list hides frames",
            first_shown=5,
        ),
    ),
    "audio_only.m4a": (
        _audio_only,
        ZooVideo("audio_only.m4a", 0, 0.0, 0, 0, refused="no video stream (audio only)"),
    ),
    "corrupt_start.mp4": (
        _corrupt_start,
        ZooVideo(
            "corrupt_start.mp4",
            30,
            30 / 25,
            WIDTH,
            HEIGHT,
            decord="its frame count differs",
            first_shown=10,
            skipped=10,
        ),  # fmt: skip
    ),
}

ZOO: dict[str, ZooVideo] = {name: video for name, (_, video) in _ZOO.items()}
"""Every file the zoo can make, by name (`make_video_zoo` leaves out those in `ZOO_SKIPPED`)."""

for _name, _codec in (("hevc.mp4", "libx265"), ("hevc_closed_gop.mp4", "libx265"), ("hevc10.mkv", "libx265"),
                      ("av1.mkv", "libsvtav1")):  # fmt: skip
    if not _has_encoder(_codec):
        ZOO_SKIPPED[_name] = f"this FFmpeg has no {_codec} encoder"
