"""Benchmark: training steps from the feature cache vs from raw video, same model and batch.

    python benchmarks/bench_train.py                 # tiny preset, 32 px and 224 px frames
    python benchmarks/bench_train.py --quick         # tiny preset at 32 px only
    python benchmarks/bench_train.py --threads 4     # torch threads (default 1: shared machines)

The world: synthetic H.264 videos (`pipeline.demo.synth`) and a tiny random BLIP-2 (T5 flavour).
The cache is written by the real `extract` stage. A step is what `pipeline.training.fit` does
per optimiser step (data loader -> `to_device` -> CE loss -> backward -> AdamW), timed after
warm-up; the epoch time is steps per epoch / steps per second. From the cache a step reads
float16 tokens; from video it decodes `num_frames` frames per video (PyAV), normalises them
and runs the frozen ViT first.

Configurations: `tiny-32px` is the test model as is (17 tokens per frame); `tiny-224px` feeds
it 224 px frames (785 tokens per frame, position embeddings interpolated), a mid-size data path
where decoding, resizing and the ViT are no longer negligible. Neither has ViT-g's cost (39
blocks of width 1408 per frame), which is what makes the cache pay off most on real models.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import config_from_dict


def build(root: Path, num_videos: int) -> dict[str, str]:
    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model

    world = make_synthetic_world(root / "world", num_videos=num_videos, seed=0)
    model = init_model(root / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    return {"annotations": world["annotations"], "videos": world["videos"], "model": str(model)}


def make_config(paths: dict[str, str], root: Path, name: str, image_size: int, frames: int, batch: int):
    return config_from_dict(
        {
            "run": {"output_dir": str(root / name), "device": "cpu"},
            "data": {"annotations": paths["annotations"], "video_root": paths["videos"]},
            "decode": {"backend": "pyav"},
            "model": {"pretrained": paths["model"], "num_frames": frames, "image_size": image_size},
            "cache": {"train_views": 1},
            "extract": {"batch_size": 8, "decode_workers": 1},
            "train": {"batch_size": batch, "num_workers": 0, "warmup_steps": 0},
        }
    )


def time_steps(config, source_kind: str, steps: int, warmup: int = 2) -> tuple[float, int]:
    """Seconds per optimiser step (after `warmup` steps) and the steps per epoch."""
    from pipeline.annotations import load_manifest
    from pipeline.data import Sharding, TrainPlan, make_loader, make_source, to_device
    from pipeline.model import VideoCaptioner
    from pipeline.optim import LoopSettings, build_optimizer
    from stages.train import ce_objective

    model = VideoCaptioner.from_pretrained(
        config.model.pretrained, config.model, load_vision=source_kind == "video"
    )
    records = load_manifest(config.data).split("train")
    source = make_source(config, model, records, source_kind)
    settings = LoopSettings.from_config(config, "train")
    plan = TrainPlan(records, 0, "sample", num_views=source.num_views, global_batch=settings.batch_size)
    optimizer, scheduler = build_optimizer(model, settings, total_steps=10_000)
    model.train()
    batches = iter([])
    started, timed = time.perf_counter(), 0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(make_loader(plan, source, step, Sharding(settings.batch_size), 0, 0, False))
            batch = next(batches)
        loss, _ = ce_objective(model, to_device(batch, source, "cpu"))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        timed += step >= warmup
    return (time.perf_counter() - started) / timed, plan.steps_per_epoch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 32 px configuration")
    parser.add_argument("--videos", type=int, default=80, help="synthetic videos (60%% are training videos)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--batch", type=int, default=8, help="videos per step")
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import stages.extract as extract

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args.videos)
        sizes = [32] if args.quick else [32, 224]
        for size in sizes:
            config = make_config(paths, root, f"tiny-{size}px", size, args.frames, args.batch)
            extract.run(config)
            cache_s, per_epoch = time_steps(config, "cache", args.steps)
            video_s, _ = time_steps(config, "video", args.steps)
            rows.append((f"tiny-{size}px", size, cache_s, video_s, per_epoch))

    print(
        f"\ntraining steps, CPU, {args.threads} thread(s), batch {args.batch} videos x {args.frames} frames"
    )
    header = f"{'config':<12}{'source':<8}{'steps/s':>10}{'s/step':>10}{'epoch s':>10}{'video/cache':>13}"
    print(header)
    print("-" * len(header))
    for name, _, cache_s, video_s, per_epoch in rows:
        for source, seconds in (("cache", cache_s), ("video", video_s)):
            ratio = f"{video_s / cache_s:>12.1f}x" if source == "video" else ""
            print(
                f"{name:<12}{source:<8}{1 / seconds:>10.2f}{seconds:>10.3f}{seconds * per_epoch:>10.1f}{ratio:>13}"
            )


if __name__ == "__main__":
    main()
