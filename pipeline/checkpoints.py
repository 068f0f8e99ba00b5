"""Training checkpoints: written atomically, resumed bit for bit on CPU.

`<stage>/checkpoints/step_XXXXXXXX/` holds the trainable weights (safetensors), the optimizer
and scheduler states, every rank's RNG states and the loop state (data position, best score);
all of it loads with `torch.load(weights_only=True)`. A checkpoint is built in a hidden folder
and renamed into place, so a kill leaves the previous ones intact; the last two are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import diff_settings
from pipeline.runtime.distributed import DistEnv, gather
from pipeline.runtime.files import atomic_write_json, disk_full_names, fsync_path, fsync_tree
from pipeline.runtime.stage import StageError
from pipeline.sharding import full_optimizer_state, load_optimizer_state

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class LoopState:
    """Where training is; saved in every checkpoint."""

    global_step: int = 0
    best_cider: float = -1.0
    best_score: float = -1.0
    """The selection score of the best model (`select`: CIDEr-D, or CIDEr-D + BLEU-4)."""
    best_epoch: int = -1
    best_step: int = -1
    start_cider: float | None = None
    last_cider: float | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Validation results: [{"epoch", "step", "val_cider"}]."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain lists (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    folder = stage_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def save_checkpoint(
    stage_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: LoopState,
    env: DistEnv,
    meta: dict[str, Any],
) -> Path | None:
    """Write `checkpoints/step_XXXXXXXX/` atomically (rank 0); every rank must call it (RNG gather)."""

    rngs = gather(env, rng_state())
    optimizer_state = full_optimizer_state(optimizer)  # FSDP: every rank gathers its moments' shards
    if not env.master_process:
        return None
    folder = stage_dir / CHECKPOINTS
    final = folder / f"step_{state.global_step:08d}"
    tmp = folder / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.trainable_state_dict().items()
    }
    with disk_full_names(tmp):  # a full disk: one message naming it; the checkpoints before stay intact
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "state": asdict(state),
            },
            tmp / "state.pt",
        )
    atomic_write_json(tmp / "meta.json", {**meta, "step": state.global_step, "world_size": env.world_size})
    fsync_tree(tmp)
    if final.exists():  # a stale one from before a resume: replaced
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(folder)
    for old in sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, env: DistEnv) -> LoopState:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; return the loop state."""

    model.load_trainable_state_dict(load_file(str(path / "trainable.safetensors"), device=str(env.device)))
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    load_optimizer_state(optimizer, saved["optimizer"])  # sharded again under FSDP
    scheduler.load_state_dict(saved["scheduler"])
    state = LoopState(**saved["state"])
    rngs = saved["rng"]
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    else:  # resumed on another number of processes: data order is unaffected, dropout is reseeded
        seed_everything(state.global_step * 1000 + env.rank)
    return state


def check_checkpoint_settings(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint written under other stage settings."""

    saved = json.loads((path / "meta.json").read_text()).get("settings", {})
    changes = diff_settings(saved, settings)
    if changes:
        raise StageError(
            f"{path} was written with other settings:\n  "
            + "\n  ".join(changes)
            + "\nre-run with --force to start this stage over, or restore the settings to resume"
        )


def check_checkpoint_plan(path: Path, steps_per_epoch: int, total_steps: int) -> None:
    """Refuse to resume when the data plan changed (e.g. more videos extracted since): the saved
    step would point at another epoch and position."""
    meta = json.loads((path / "meta.json").read_text())
    saved = (meta.get("steps_per_epoch", steps_per_epoch), meta.get("total_steps", total_steps))
    if saved != (steps_per_epoch, total_steps):
        raise StageError(
            f"{path} was written for {saved[0]} steps per epoch and {saved[1]} steps in all; the data now "
            f"gives {steps_per_epoch} and {total_steps} (did the set of videos change?). Re-run with "
            "--force to start this stage over"
        )


def replace_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Replace folder `target` by what `write(tmp)` puts in a fresh folder, never leaving neither.

    A kill between the two renames leaves `.<name>.old`; `recover_dir` puts it back.
    """
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    fsync_tree(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.rename(old, target)
