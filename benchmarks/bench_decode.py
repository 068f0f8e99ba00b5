"""Decode speed per CPU core: each backend at 8 and 16 frames vs a plain sequential FFmpeg decode.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode.py                  # 6 MSR-VTT-like clips + the zoo
    python benchmarks/bench_decode.py --clips 20 --seconds 10 30 --repeat 3

MSR-VTT-like clips are made here (nothing is downloaded): 320x240 H.264 (x264 veryfast, its
default GOP of 250 frames and B-frames), 30 fps, lengths spread over `--seconds`, showing a
moving noise texture so the bitrate is that of real footage. The zoo is
`pipeline/demo/videozoo.py` (64x48, 1-3 s, one file per kind of real-world trouble).

Printed per (files, method): videos/s and frames/s per core, measured in CPU seconds of this
process (`time.process_time`, all threads), with the decoder held to one thread, so the
numbers divide into the cores a machine has. Methods:

* `sequential`: PyAV decodes every frame of the file to RGB, nothing else (the floor);
* `pyav T=8` / `T=16`: `load_clip(view=0)`, what extract does per video: probe, decode up to
  the last sampled frame, 224 px bicubic resize;
* `decord T=8` / `T=16`: the same with `backend="decord"` (checks, then decord's random
  access; on files where it is not exact, pyav with the fallback counted, printed).

Nothing is asserted; the README quotes a run.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline.demo.videozoo import make_video_zoo
from pipeline.video import load_clip, probe_video

IMAGE_SIZE = 224


def make_msrvtt_like(folder: Path, count: int, seconds: tuple[float, float], fps: int = 30) -> list[Path]:
    """`count` 320x240 H.264 clips with lengths evenly spread over [seconds[0], seconds[1]]."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(240 + 300, 320 + 300, 3), dtype=np.uint8)
    paths = []
    for i, length in enumerate(np.linspace(seconds[0], seconds[1], count)):
        path = folder / f"video{i}.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            for k in range(int(length * fps)):
                y, x = (k * 2) % 300, (k * 3 + 40 * i) % 300  # a slow pan over the texture
                image = np.ascontiguousarray(texture[y : y + 240, x : x + 320])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        paths.append(path)
    return paths


def sequential(path: Path) -> int:
    """Every frame to RGB with one decoder thread (packets that fail to decode skipped); returns
    the frame count."""
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.best("video")
        stream.codec_context.thread_count = 1
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue
            count += sum(1 for frame in frames if frame.to_ndarray(format="rgb24") is not None)
    return count


def measure(paths: list[Path], repeat: int, run) -> tuple[float, float, collections.Counter]:
    """(CPU seconds per pass over `paths`, frames per pass, fallback reasons) of `run(path, fallbacks)`."""
    fallbacks: collections.Counter = collections.Counter()
    frames, started = 0, time.process_time()
    for _ in range(repeat):
        for path in paths:
            reasons: list[str] = []
            frames += run(path, reasons)
            fallbacks.update(set(reasons))
    cpu = (time.process_time() - started) / repeat
    return cpu, frames / repeat, collections.Counter({k: v // repeat for k, v in fallbacks.items()})


def bench(name: str, paths: list[Path], repeat: int) -> None:
    infos = [probe_video(p) for p in paths]
    total = sum(i.num_frames for i in infos)
    print(f"\n{name}: {len(paths)} files, {total} frames, {sum(i.duration for i in infos):.1f} s of video")
    cpu, frames, _ = measure(paths, repeat, lambda p, _r: sequential(p))
    print(
        f"  {'sequential (all frames)':24s} {len(paths) / cpu:8.2f} videos/s/core {frames / cpu:9.1f} frames/s/core"
    )
    for backend in ("pyav", "decord"):
        for t in (8, 16):

            def run(path, reasons, t=t, backend=backend):
                load_clip(path, t, IMAGE_SIZE, backend=backend, threads=1, fallbacks=reasons)
                return t

            cpu, frames, fallbacks = measure(paths, repeat, run)
            note = f"  fallbacks: {dict(fallbacks)}" if fallbacks else ""
            print(f"  {backend + f' T={t}':24s} {len(paths) / cpu:8.2f} videos/s/core {frames / cpu:9.1f} "
                  f"sampled frames/s/core{note}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=6, help="MSR-VTT-like clips to make")
    parser.add_argument(
        "--seconds", type=float, nargs=2, default=(10.0, 30.0), help="shortest and longest clip"
    )
    parser.add_argument("--repeat", type=int, default=2, help="passes over the files per measurement")
    parser.add_argument("--no-zoo", action="store_true", help="skip the zoo")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "msrvtt").mkdir()
        print(f"bench_decode: av {av.__version__}, {args.clips} MSR-VTT-like clips, repeat {args.repeat}")
        bench("MSR-VTT-like (320x240 H.264, 30 fps)", make_msrvtt_like(root / "msrvtt", args.clips, args.seconds),
              args.repeat)  # fmt: skip
        if not args.no_zoo:
            zoo = make_video_zoo(root / "zoo")
            decodable = [root / "zoo" / name for name, video in zoo.items() if not video.refused]
            bench("zoo (64x48, 1-3 s)", decodable, args.repeat * 5)


if __name__ == "__main__":
    main()
