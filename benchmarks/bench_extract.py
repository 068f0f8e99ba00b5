"""Throughput of stage `extract`: videos/s and where the time goes, in-process vs local Dask.

    python benchmarks/bench_extract.py                      # tiny + mid ViT, 24 videos, CPU
    python benchmarks/bench_extract.py --videos 200 --models mid --workers 0 4 --device cuda

Models are random BLIP-2s built here (nothing is downloaded): `tiny` (the test preset: ViT
width 32, 2 layers, 32 px) and `mid` (ViT width 384, 6 layers, patch 16, 224 px -> 197
tokens per frame, i.e. a ViT-S-sized encoder). Videos are the synthetic world's 64x64 H.264
clips (16 frames), decoded and resized to the model's image size.

Printed per (model, mode): wall seconds (setup = starting workers + loading/hashing the ViT),
videos/s over the extraction itself, and the time split: decode (summed over decode threads),
decode_wait (the ViT loop waiting for frames: > 0 means decoding is the bottleneck), ViT,
write (compress + fsync, in a writer thread). Numbers print; nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

MID_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  patch_size=16, image_size=224, initializer_range=0.02)  # fmt: skip


def build_model(root: Path, name: str, annotations: Path) -> tuple[Path, int]:
    """A random BLIP-2 folder and its image size."""
    from pipeline.demo.testmodels import init_model

    folder = init_model(root / name, "tiny-t5", vocab_from=annotations, seed=0)
    if name == "tiny":
        return folder, 32
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2VisionConfig

    config = Blip2Config.from_pretrained(folder)
    config.vision_config = Blip2VisionConfig(**MID_VISION)
    config.qformer_config.encoder_hidden_size = MID_VISION["hidden_size"]  # cross-attention reads the ViT
    Blip2ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder, MID_VISION["image_size"]


def bench(
    root: Path, world: dict, model: Path, image_size: int, workers: int, args: argparse.Namespace
) -> dict:
    from pipeline.config import config_from_dict
    from stages.extract import run

    out = root / f"run-{model.name}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    config = config_from_dict({
        "run": {"output_dir": str(out), "device": args.device},
        "data": {"annotations": world["annotations"], "video_root": world["videos"]},
        "model": {"pretrained": str(model), "num_frames": args.frames, "image_size": image_size},
        "cache": {"train_views": args.train_views},
        "extract": {"batch_size": args.batch_size, "decode_workers": args.decode_workers, "workers": workers},
        "decode": {"backend": args.backend},
    })  # fmt: skip
    started = time.time()
    summary = run(config)
    summary["wall_s"] = time.time() - started
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--train-views", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--backend", default="pyav", choices=("pyav", "decord"))
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=("tiny", "mid"))
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[0, 2], help="0: in-process; N: N local Dask workers"
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from pipeline.demo.synth import make_synthetic_world

    root = Path(tempfile.mkdtemp(prefix="bench_extract-"))
    try:
        world = make_synthetic_world(root / "world", num_videos=args.videos, seed=0)
        rows = []
        for name in args.models:
            model, size = build_model(root, name, Path(world["annotations"]))
            for workers in args.workers:
                rows.append((name, workers, bench(root, world, model, size, workers, args)))
        print(f"\nextract: {args.videos} videos x {args.frames} frames x {1 + args.train_views} views, "
              f"batch {args.batch_size}, {args.decode_workers} decode threads, {args.backend}")  # fmt: skip
        header = (
            "model",
            "mode",
            "wall_s",
            "setup_s",
            "videos/s",
            "decode_s",
            "decode_wait_s",
            "vit_s",
            "write_s",
        )
        print("".join(f"{h:>14}" for h in header))
        for name, workers, s in rows:
            mode = f"dask x{workers}" if workers else "in-process"
            cells = (name, mode, s["wall_s"], s["setup_s"], s["videos_per_s"], s["decode_s"], s["decode_wait_s"],
                     s["vit_s"], s["write_s"])  # fmt: skip
            print("".join(f"{c:>14.2f}" if isinstance(c, float) else f"{c:>14}" for c in cells))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
