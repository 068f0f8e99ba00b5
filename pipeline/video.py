"""Video decoding and writing. (Being built: decoding backends land here.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mkv": "libx264"}


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, codec: str | None = None) -> None:
    """Encode uint8 RGB frames (N, H, W, 3) into a real video file with PyAV.

    The codec defaults by extension: H.264 for .mp4/.mkv, VP9 for .webm, MPEG-4 for .avi.
    Odd sizes are allowed for codecs that take them (yuv444p is used for H.264 then).
    """
    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape}")
    codec = codec or CODECS.get(path.suffix.lower(), "libx264")
    height, width = frames.shape[1:3]
    odd = height % 2 or width % 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if (odd and codec == "libx264") else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
