"""Windowed decoding (`caption.window`) costs time linear in the video's length: seconds per video-minute.

    python benchmarks/bench_windows.py                          # 1, 2, 4, 8 min at 25 fps, 10 s windows
    python benchmarks/bench_windows.py --minutes 1 2 --seek-minutes 1 2 --window 5

For each length, a synthetic H.264 video (moving gradient, 160x120, 25 fps) is written once,
then its windows are decoded with `pipeline.windows.iter_windows` (one sequential pass, what
`vidcap caption` does) and, for the lengths in `--seek-minutes`, with `load_clip(start_sec=,
end_sec=)` per window (decoding each window on its own: with PyAV, from the start of the file
every time). Printed: seconds, seconds per video-minute (flat when the cost is linear) and
peak resident memory growth. Numbers print; nothing is asserted.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_long_video(path: Path, minutes: float, fps: int, width: int, height: int) -> None:
    """Encode frame after frame (a whole array of a long video would not fit in memory)."""
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(int(minutes * 60 * fps)):
            level = ((xs + ys + 3 * i) % 256).astype(np.uint8)
            frame = np.stack([level, np.roll(level, i % width, axis=1), 255 - level], axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", nargs="+", type=float, default=[1, 2, 4, 8])
    parser.add_argument(
        "--seek-minutes", nargs="*", type=float, default=[1, 2], help="also time per-window decoding"
    )
    parser.add_argument("--window", type=float, default=10.0, help="window length, seconds")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per window")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", default="160x120", help="video frame size WxH")
    args = parser.parse_args(argv)

    from pipeline.video import load_clip
    from pipeline.windows import iter_windows

    width, height = (int(v) for v in args.size.split("x"))
    print(f"bench_windows: {args.window:g} s windows, {args.frames} frames of {args.image_size}px each, "
          f"{width}x{height} H.264 at {args.fps} fps")  # fmt: skip
    print(f"{'minutes':>8}{'windows':>9}{'method':>12}{'seconds':>10}{'s/video-min':>13}{'peak RSS MB':>13}")
    with tempfile.TemporaryDirectory(prefix="bench_windows-") as tmp:
        for minutes in args.minutes:
            path = Path(tmp) / f"{minutes:g}min.mp4"
            write_long_video(path, minutes, args.fps, width, height)
            started = time.perf_counter()
            spans = [(w.start, w.end) for w in iter_windows(path, args.frames, args.image_size, args.window)]
            seconds = time.perf_counter() - started
            print(f"{minutes:>8g}{len(spans):>9}{'one pass':>12}{seconds:>10.2f}{seconds / minutes:>13.2f}"
                  f"{peak_rss_mb():>13.0f}")  # fmt: skip
            if minutes in args.seek_minutes:
                started = time.perf_counter()
                for start, end in spans:
                    load_clip(
                        path, args.frames, args.image_size, backend="pyav", start_sec=start, end_sec=end
                    )
                seconds = time.perf_counter() - started
                print(f"{minutes:>8g}{len(spans):>9}{'per window':>12}{seconds:>10.2f}{seconds / minutes:>13.2f}"
                      f"{peak_rss_mb():>13.0f}")  # fmt: skip
            path.unlink()


if __name__ == "__main__":
    main()
