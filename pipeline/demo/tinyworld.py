"""A tiny cached world for tests and benchmarks: a synthetic world, a tiny random BLIP-2 (T5 flavour)
and a feature store filled with that model's ViT tokens (evaluation view + augmented views), plus a
small training config over it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import ModelConfig, config_from_dict

NUM_FRAMES, IMAGE_SIZE, TRAIN_VIEWS = 4, 32, 2


def build_tiny_world(root: Path, num_videos: int = 20) -> dict[str, str]:
    """World + tiny model + filled cache under `root`, built once (a marker file says it is complete)."""
    ready = root / "ready.json"
    if ready.exists():
        return json.loads(ready.read_text())
    from cache.store import FeatureStore
    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model
    from pipeline.features import cache_fingerprint, hash_weights
    from pipeline.model import VideoCaptioner
    from pipeline.sampling import normalize_frames
    from pipeline.video import load_clip

    world = make_synthetic_world(root / "world", num_videos=num_videos, seed=0)
    model_dir = init_model(root / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    cfg = ModelConfig(pretrained=str(model_dir), num_frames=NUM_FRAMES, image_size=IMAGE_SIZE)
    model = VideoCaptioner.from_pretrained(model_dir, cfg, load_vision=True)
    rows = [json.loads(line) for line in Path(world["annotations"]).read_text().splitlines()]
    paths = {
        "annotations": world["annotations"],
        "videos": world["videos"],
        "model": str(model_dir),
        "cache": str(root / "features.zarr"),
        "root": str(root),
    }
    vit = {
        "weights_sha256": hash_weights(model.blip.vision_model),
        "tokens_per_frame": model.tokens_per_frame,
        "width": model.vision_width,
        "dtype": "float32",
    }
    store = FeatureStore.create(
        root / "features.zarr",
        [r["video_id"] for r in rows],
        num_views=1 + TRAIN_VIEWS,
        num_frames=NUM_FRAMES,
        tokens_per_frame=model.tokens_per_frame,
        width=model.vision_width,
        fingerprint=cache_fingerprint(tiny_config(paths, root / "unused"), vit),  # as extract writes it
    )
    for row in rows:
        path = str(Path(world["videos"]) / row["video"])
        clips = np.stack(
            [
                load_clip(
                    path, NUM_FRAMES, IMAGE_SIZE, view=v, seed=0, video_id=row["video_id"], backend="pyav"
                )
                for v in range(1 + TRAIN_VIEWS)
            ]
        )
        store.write_video(row["video_id"], model.encode_frames(normalize_frames(clips)))  # (V, T, L, D)
    ready.write_text(json.dumps(paths))
    return paths


def tiny_config(world: dict[str, str], out_dir: str | Path, **sections):
    raw = {
        "run": {"output_dir": str(out_dir), "seed": 0, "device": "cpu"},
        "data": {"annotations": world["annotations"], "video_root": world["videos"]},
        "decode": {"backend": "pyav"},
        "model": {"pretrained": world["model"], "num_frames": NUM_FRAMES, "image_size": IMAGE_SIZE},
        "cache": {"path": world["cache"], "train_views": TRAIN_VIEWS},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "warmup_steps": 2,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "checkpoint_every": 2,
            "log_every": 1,
            "num_workers": 0,
            "val_max_videos": 4,
        },
        "eval": {"batch_size": 4, "max_new_tokens": 8, "min_new_tokens": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)
