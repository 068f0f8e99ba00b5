"""Throughput of `vidcap caption`: videos/s and the decode / ViT / generate split, in-process vs Dask.

    python benchmarks/bench_caption.py                       # tiny model, 24 videos, CPU
    python benchmarks/bench_caption.py --videos 200 --workers 0 4 --beams 5

The model is the tiny random BLIP-2 test preset (nothing is downloaded); videos are the
synthetic world's H.264 clips. Printed per mode: wall seconds (setup = starting workers and
loading the model on each), videos/s once the models are loaded, and seconds spent decoding
(summed over threads), waiting for decoded frames, in the ViT and in `generate` (summed over
workers). Numbers print; nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[0, 2], help="0: in-process; N: N local Dask workers"
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from pipeline.config import config_from_dict
    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model
    from stages.caption import caption_videos

    root = Path(tempfile.mkdtemp(prefix="bench_caption-"))
    try:
        world = make_synthetic_world(root / "world", num_videos=args.videos, seed=0)
        model = str(init_model(root / "tiny", "tiny-t5", vocab_from=world["annotations"], seed=0))
        rows = []
        for workers in args.workers:
            config = config_from_dict({
                "run": {"device": args.device},
                "model": {"num_frames": args.frames, "image_size": 32},
                "caption": {"batch_size": args.batch_size, "decode_workers": args.decode_workers,
                            "num_beams": args.beams, "max_new_tokens": args.max_new_tokens, "workers": workers},
            })  # fmt: skip
            started = time.time()
            summary = caption_videos([world["videos"]], model, str(root / f"out-{workers}.jsonl"), config)
            summary["wall_s"] = time.time() - started
            rows.append((workers, summary))
        print(f"\ncaption: {args.videos} videos x {args.frames} frames, tiny model, batch {args.batch_size}, "
              f"{args.beams} beams, <= {args.max_new_tokens} tokens")  # fmt: skip
        header = ("mode", "wall_s", "setup_s", "videos/s", "decode_s", "decode_wait_s", "vit_s", "generate_s")
        print("".join(f"{h:>14}" for h in header))
        for workers, s in rows:
            cells = (f"dask x{workers}" if workers else "in-process", s["wall_s"], s["setup_s"], s["videos_per_s"],
                     s["decode_s"], s["decode_wait_s"], s["vit_s"], s["generate_s"])  # fmt: skip
            print("".join(f"{c:>14.2f}" if isinstance(c, float) else f"{c:>14}" for c in cells))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
