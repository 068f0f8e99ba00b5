"""vidcap from Python: the same code paths as the command line, as a few names.

from pipeline.app.api import Captioner, open_cache, run_config

summary = run_config("configs/demo.yaml")                 # = python run_pipeline.py --config ...
captioner = Captioner("runs/demo/scst/best")              # an export, a run's best/, or a base BLIP-2
records = captioner.caption_files(["clip.mp4", "videos/"])  # = vidcap caption ... (one dict per video)
captions = captioner.caption_frames(frames)               # uint8 (B, T, H, W, 3), already decoded
store = open_cache("runs/demo/extract/features.zarr")     # the feature cache, read-only
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.store import FeatureStore
from pipeline.config import Config, load_config
from pipeline.runtime.records import read_records
from pipeline.runtime.stage import configure_threads
from pipeline.sampling import normalize_frames
from run_pipeline import run_pipeline
from stages.caption import caption_videos, load_captioner

__all__ = ["Captioner", "open_cache", "run_config"]


def run_config(
    config: str | Path | Config,
    overrides: Sequence[str] = (),
    stages: Sequence[str] = (),
    force: Sequence[str] = (),
) -> dict[str, Any]:
    """Run a config's pipeline (its `run.stages`, or `stages`); returns the run summary.

    `config` is a YAML path (with `overrides` as `section.key=value`, like `--set`) or a `Config`.
    """
    if not isinstance(config, Config):
        config = load_config(config, list(overrides))
    configure_threads(config)
    return run_pipeline(config, stages=list(stages), force=list(force))


def open_cache(path: str | Path) -> FeatureStore:
    """A feature cache, read-only: `.video_ids`, `.read(ids, views=0)`, `.info()`, `.fingerprint`."""
    return FeatureStore.open(path)


class Captioner:
    """A video captioner loaded once: caption files (decoded as `vidcap caption` does) or frames.

    `model` is an exported folder (`vidcap export`), a run's `train/best` or `scst/best`, or a base
    BLIP-2 (hub id or folder: zero-shot, with `config.model`'s frames and prompt). `config` supplies
    the decoding and generation settings (`decode`, `caption` sections); defaults otherwise.
    """

    def __init__(self, model: str | Path, config: Config | None = None) -> None:
        self.model_path = str(model)
        self.config = config if config is not None else Config()
        self.model, settings, self.device = load_captioner(self.model_path, self.config)
        self.num_frames: int = settings["num_frames"]
        self.image_size: int = settings["image_size"]

    def caption_files(self, inputs: Sequence[str | Path], out: str | Path | None = None) -> list[dict]:
        """Caption video files, folders, globs or manifests; one record per video (or window).

        A record is `{"video", "caption", ...}` or `{"video", "error"}` for a file that could not
        be read. With `out`, records are also kept in that JSONL, and a re-run skips what it holds.
        """
        with tempfile.TemporaryDirectory(prefix="vidcap-api-") as scratch:
            path = Path(out) if out is not None else Path(scratch) / "captions.jsonl"
            caption_videos([str(i) for i in inputs], self.model_path, str(path), self.config)
            return list(read_records(path))

    @torch.no_grad()
    def caption_frames(self, frames: np.ndarray | torch.Tensor) -> list[str]:
        """Caption already decoded clips: uint8 RGB (B, T, H, W, 3) or one clip (T, H, W, 3).

        T must be the model's `num_frames` and H = W its `image_size` (sample and resize first:
        `pipeline.video.load_clip` does both for a file).
        """
        clips = torch.as_tensor(np.asarray(frames))
        if clips.ndim == 4:
            clips = clips.unsqueeze(0)
        expected = (self.num_frames, self.image_size, self.image_size, 3)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(
                f"frames: expected (B, {', '.join(map(str, expected))}), got {tuple(clips.shape)}"
            )
        pixels = torch.stack([normalize_frames(c) for c in clips]).to(self.device)  # (B, T, 3, S, S)
        cap = self.config.caption
        out = self.model.generate(
            self.model.encode_frames(pixels),
            num_beams=cap.num_beams,
            max_new_tokens=cap.max_new_tokens,
            min_new_tokens=cap.min_new_tokens,
        )
        return list(out.texts)
