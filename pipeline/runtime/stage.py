"""What every stage shares: its folder, `DONE.json`, the fingerprint check, logging, progress.

A stage is a plain function `run(config, force=False) -> dict`. It opens a `Stage`, which
decides whether the work is already done (same fingerprint), refused (a different
fingerprint without `force`), or to be (re)started, and sets up a log file in the stage
folder. The stage writes its outputs under `stage.dir` and ends with `stage.finish(summary)`,
which writes `DONE.json` atomically. Killing the stage before that leaves no `DONE.json`,
so a re-run resumes from whatever checkpoints the stage itself keeps.

    def run(config, force=False):
        stage = Stage(config, "train", force=force)
        if stage.done:
            return stage.summary
        ...
        return stage.finish({"best_cider": 0.61})
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from pipeline.config import Config, check_stage_inputs, diff_settings, stage_fingerprint, stage_settings
from pipeline.errors import StageError
from pipeline.runtime.files import atomic_write_json

DONE_FILE = "DONE.json"
LOG_FILE = "log.txt"
T = TypeVar("T")


class Stage:
    """One stage's folder and bookkeeping: skip when done, refuse a changed config, log to a file."""

    def __init__(self, config: Config, name: str, force: bool = False, fresh_on_force: bool = False):
        check_stage_inputs(config, name)  # before anything is read, skipped or deleted
        self.config = config
        self.name = name
        self.dir = config.stage_dir(name)
        self.fingerprint = stage_fingerprint(config, name)
        self.settings = stage_settings(config, name)
        self.summary: dict[str, Any] = {}
        self.started = time.time()
        previous = read_done(config, name)
        self.done = False
        if previous is not None:
            if previous.get("fingerprint") == self.fingerprint and not force:
                self.done = True
                self.summary = previous.get("summary", {})
            elif not force:
                changes = diff_settings(previous.get("settings", {}), self.settings)
                raise StageError(
                    f"stage {name!r} already finished in {self.dir} with other settings:\n  "
                    + "\n  ".join(changes or ["(upstream outputs changed)"])
                    + "\nre-run with --force to redo it, or use another run.output_dir"
                )
            else:
                (self.dir / DONE_FILE).unlink(missing_ok=True)
                if fresh_on_force and self.dir.exists():
                    shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = stage_logger(name, self.dir / LOG_FILE)
        if self.done:
            self.log.info("stage %s: already done (fingerprint %s), skipping", name, self.fingerprint)
        else:
            self.log.info("stage %s: starting in %s (fingerprint %s)", name, self.dir, self.fingerprint)
            atomic_write_json(self.dir / "config.json", {"source": config.source, **config.to_dict()})

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write `DONE.json` (fingerprint, settings, summary, time taken) and return the summary."""
        seconds = round(time.time() - self.started, 2)
        summary = {**summary, "seconds": summary.get("seconds", seconds)}
        record = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "summary": summary,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.dir / DONE_FILE, record)
        self.summary = summary
        self.log.info("stage %s: done in %.1f s", self.name, seconds)
        return summary


def read_done(config: Config, name: str) -> dict[str, Any] | None:
    """The `DONE.json` record of a finished stage, or None."""
    path = config.stage_dir(name) / DONE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic), but a hand-edited file should not crash us


def stage_logger(name: str, path: Path) -> logging.Logger:
    """A logger writing to `path` and to stderr; idempotent across re-creations in one process."""
    logger = logging.getLogger(f"vidcap.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(file_handler)
    logger.addHandler(console)
    return logger


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", initial: int = 0, disable: bool = False
) -> Iterator[T]:
    """A progress bar (done/total, rate, ETA) on stderr; plain lines when stderr is not a terminal."""

    interval = 0.5 if sys.stderr.isatty() else 10.0
    yield from tqdm(
        iterable,
        total=total,
        desc=desc,
        initial=initial,
        mininterval=interval,
        disable=disable,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def configure_threads(config: Config) -> None:
    """Apply `run.threads` (torch's CPU threads) for this process; 0 leaves torch's default."""
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when available, else `cpu`; anything else is passed through."""

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"run.device={spec!r} but no CUDA device is available")
    return spec
