"""What every stage shares: its folder, `DONE.json`, the fingerprint check, logging, progress.

A stage is a plain function `run(config, force=False) -> dict`, decorated with `stage_entry`.
It opens a `Stage`, which decides whether the work is already done (same fingerprint), refused
(a different fingerprint without `force`, with the reasons), or to be (re)started, takes the
stage folder's lock (`pipeline.runtime.locks`: a second concurrent run is refused), and sets up
a log file in the stage folder. The stage writes its outputs under `stage.dir` and ends with
`stage.finish(summary)`, which writes `DONE.json` atomically. Killing the stage before that
leaves no `DONE.json`, so a re-run resumes from whatever checkpoints the stage itself keeps.

    @stage_entry("train")
    def run(config, force=False):
        stage = Stage(config, "train", force=force)
        if stage.done:
            return stage.summary
        ...
        return stage.finish({"best_cider": 0.61})

The fingerprint covers the stage's settings (`pipeline.config.STAGE_KEYS`) and its inputs
(`stage_inputs`): the annotation files by content, the base model folder's identity, and the
run id of each upstream stage's `DONE.json`, so an edited annotation file or a redone upstream
stage makes the stage stale, and the refusal says why ("annotations changed", "extract was redone").

`--force` never deletes what vidcap did not write: a stage folder is replaced only when it holds
our `DONE.json` or `config.json`. It is first moved aside to `<output_dir>/.<stage>.replaced`;
if the new run fails with an error (a bad value found while the stage sets up, say), the old
folder is put back; the aside copy is deleted only when the new run finishes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from pipeline.config import STAGES, Config, check_stage_inputs, diff_settings, stage_settings
from pipeline.errors import ConfigError, StageError
from pipeline.runtime import locks
from pipeline.runtime.files import atomic_write_json

DONE_FILE = "DONE.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"
T = TypeVar("T")

# stage folder -> [(output, its aside copy)] that --force moved aside in this process, folder first
_replaced: dict[Path, list[tuple[Path, Path]]] = {}


class Stage:
    """One stage's folder and bookkeeping: skip when done, refuse a changed config, log to a file."""

    def __init__(
        self,
        config: Config,
        name: str,
        force: bool = False,
        extra_inputs: dict[str, Any] | None = None,
    ):
        """`extra_inputs`: more of what the stage reads ({name: identity}), beside `stage_inputs`.

        A forced stage starts from an empty folder (the previous one is moved aside until the new
        run finishes).
        """
        check_stage_inputs(config, name)  # before anything is read, skipped or deleted
        self.config = config
        self.name = name
        self.dir = config.stage_dir(name)
        self.settings = stage_settings(config, name)
        self.inputs = {**stage_inputs(config, name), **(extra_inputs or {})}
        self.fingerprint = full_fingerprint(self.settings, self.inputs)
        self.summary: dict[str, Any] = {}
        self.started = time.time()
        check_outputs_apart(_stage_outputs(config, name), _stage_input_paths(config))
        locks.acquire(self.dir, f"stage folder of {name!r}")
        previous = read_done(config, name)
        self.done = False
        if previous is not None and previous.get("fingerprint") == self.fingerprint and not force:
            self.done = True
            self.summary = previous.get("summary", {})
        elif previous is not None and not force:
            reasons = diff_settings(previous.get("settings", {}), self.settings)
            reasons += input_changes(previous.get("inputs"), self.inputs)
            raise StageError(
                f"stage {name!r} already finished in {self.dir} with other settings or inputs:\n  "
                + "\n  ".join(reasons or ["(upstream outputs changed)"])
                + "\nre-run with --force to redo it, or use another run.output_dir"
            )
        elif force:
            _replaced.pop(self.dir, None)
            if not _is_ours(self.dir):
                raise StageError(
                    f"--force would replace {self.dir}, which vidcap did not write (no {DONE_FILE} or "
                    f"{CONFIG_FILE} in it); refusing to touch it: choose another run.output_dir or move it yourself"
                )
            _move_aside(self.dir, self.dir)
        self._outputs = [self.dir]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = stage_logger(name, self.dir / LOG_FILE)
        if self.done:
            self.log.info("stage %s: already done (fingerprint %s), skipping", name, self.fingerprint)
        else:
            self.log.info("stage %s: starting in %s (fingerprint %s)", name, self.dir, self.fingerprint)
            atomic_write_json(self.dir / CONFIG_FILE, {"source": config.source, **config.to_dict()})

    def replaces(self, output: Path, force: bool, is_ours: Callable[[Path], bool], what: str) -> None:
        """Another output of this stage (outside its folder): with `force`, moved aside like the folder.

        Call it once the stage has checked what it can (settings, inputs, model), just before it
        recreates `output`: `is_ours(output)` must vouch that vidcap wrote it, or it is refused.
        """
        output = Path(output)
        self._outputs.append(output)
        if not force or not (output.exists() or output.is_symlink()):
            return
        if not is_ours(output):
            raise StageError(
                f"--force would replace {output}, which is not a {what} vidcap wrote; refusing to touch it: "
                "choose another path or move it yourself"
            )
        _move_aside(self.dir, output)

    def reopen(self) -> None:
        """Treat a done stage as not done (its files stay): it will `finish` again."""
        (self.dir / DONE_FILE).unlink(missing_ok=True)
        self.done = False

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write `DONE.json` (fingerprint, settings, inputs, summary, time taken) and return the summary."""
        seconds = round(time.time() - self.started, 2)
        summary = {**summary, "seconds": summary.get("seconds", seconds)}
        record = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": self.inputs,
            "summary": summary,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": uuid.uuid4().hex,  # what downstream stages record of this result
        }
        atomic_write_json(self.dir / DONE_FILE, record)
        # What --force moved aside (in this process, or in one killed before it finished) has now
        # been replaced by a finished result.
        _replaced.pop(self.dir, None)
        for output in self._outputs:
            shutil.rmtree(_aside_path(output), ignore_errors=True)
        self.summary = summary
        self.log.info("stage %s: done in %.1f s", self.name, seconds)
        return summary


def stage_entry(name: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Decorate a stage's `run`: on an error, put back what `--force` moved aside; release the lock."""

    def decorate(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(run)
        def wrapper(config: Config, *args: Any, **kwargs: Any) -> dict[str, Any]:
            folder = config.stage_dir(name)
            try:
                return run(config, *args, **kwargs)
            except Exception:
                _put_back(folder)
                raise
            finally:
                locks.release(folder, all_levels=True)

        return wrapper

    return decorate


def check_outputs_apart(outputs: dict[str, str | Path], inputs: dict[str, str | Path]) -> None:
    """Refuse an output that is an input, or a folder holding one (writing or --force would hit it)."""
    for out_name, out in outputs.items():
        out_path = Path(out).resolve()
        for in_name, given in inputs.items():
            if not str(given) or not Path(given).exists():
                continue
            in_path = Path(given).resolve()
            if out_path == in_path or out_path in in_path.parents:
                relation = "is" if out_path == in_path else "holds"
                raise ConfigError(
                    f"{out_name} ({out}) {relation} {in_name} ({given}): an output may never be or hold an "
                    f"input; choose another {out_name}"
                )


def _stage_outputs(config: Config, name: str) -> dict[str, Path]:
    outputs = {f"run.output_dir/{name}": config.stage_dir(name)}
    if name == "extract":
        outputs["cache.path"] = config.cache_path
    return outputs


def _stage_input_paths(config: Config) -> dict[str, str]:
    return {
        "data.annotations": config.data.annotations,
        "data.video_root": config.data.video_root,
        "model.pretrained": config.model.pretrained,
    }


def _is_ours(folder: Path) -> bool:
    """Whether vidcap wrote `folder`: it holds our DONE.json or config.json (or nothing at all)."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    for name, key in ((DONE_FILE, "fingerprint"), (CONFIG_FILE, "source")):
        try:
            if key in json.loads((folder / name).read_text()):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def _move_aside(stage_dir: Path, output: Path) -> None:
    """Move an output of ours to `.<name>.replaced` beside it (an older one there is kept instead)."""
    if not output.exists():
        return
    aside = _aside_path(output)
    if aside.exists():  # a forced run before this one never finished: keep the result it replaced
        shutil.rmtree(output)
    else:
        os.rename(output, aside)
    _replaced.setdefault(stage_dir, []).append((output, aside))


def _aside_path(output: Path) -> Path:
    return output.parent / f".{output.name}.replaced"


def _put_back(stage_dir: Path) -> None:
    """After a failed forced run: what it replaced comes back, the new partial outputs go."""
    for output, aside in reversed(_replaced.pop(stage_dir, [])):
        if not aside.exists():
            continue
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        os.rename(aside, output)


# ---------------------------------------------------------------------------------------
# Inputs: what a stage reads besides its settings
# ---------------------------------------------------------------------------------------

UPSTREAM_USES_MODEL = ("extract", "train", "eval")  # stages that load `model.pretrained` itself
# Whose finished run (DONE.json run id) each stage depends on. `eval` follows the weights of the
# models it scores by itself (a retrained `ce` or a new `scst` is evaluated again, the others
# reused: stages/eval.py), so only a redone extraction (other cached tokens) makes it stale.
UPSTREAM_RUNS: dict[str, tuple[str, ...]] = {
    "extract": (),
    "train": ("extract",),
    "scst": ("train",),
    "eval": ("extract",),
    "caption": ("train", "scst"),
}


def stage_inputs(config: Config, name: str) -> dict[str, Any]:
    """{input: identity} of what `name` reads: annotations (content hash), base model, upstream runs."""
    inputs: dict[str, Any] = {}
    if name != "caption":
        inputs["annotations"] = content_hash(config.data.annotations)
    if name in UPSTREAM_USES_MODEL:
        inputs["model"] = folder_identity(config.model.pretrained)
    if name == "caption" and config.caption.model:  # a named model, not the run's best: that is the input
        inputs["model"] = folder_identity(config.caption.model)
        return inputs
    for upstream in UPSTREAM_RUNS[name]:
        done = read_done(config, upstream)
        inputs[upstream] = None if done is None else done.get("run_id", done.get("finished_at"))
    if name == "train":  # a mixture also reads its other sets (pseudo-labels get rewritten)
        for train_set in config.data.train_sets:
            if train_set.annotations:
                inputs[f"{train_set.name} annotations"] = content_hash(train_set.annotations)
    return inputs


def full_fingerprint(settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """A stable hash of a stage's settings and inputs."""
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def current_fingerprint(config: Config, name: str, extra_inputs: dict[str, Any] | None = None) -> str:
    """The fingerprint `Stage(config, name)` would have now (without opening the stage)."""
    inputs = {**stage_inputs(config, name), **(extra_inputs or {})}
    return full_fingerprint(stage_settings(config, name), inputs)


def input_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Why the inputs differ, one reason per input: "annotations changed", "extract was redone"."""
    if old is None:
        return ["inputs: not recorded (finished by an older vidcap)"]
    reasons = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if before == now:
            continue
        if key == "annotations":
            reasons.append("annotations changed (their content is not what this stage read)")
        elif key == "model":
            reasons.append("the base model (model.pretrained) changed")
        elif key == "cache":
            reasons.append(f"the feature cache changed since this stage read it: {before} -> {now}")
        elif key in STAGES:
            if now is None:
                reasons.append(f"{key} is no longer finished (its DONE.json is gone)")
            elif before is None:
                reasons.append(f"{key} finished since this stage ran")
            else:
                reasons.append(f"{key} was redone")
        else:
            reasons.append(f"{key} changed: {before!r} -> {now!r}")
    return reasons


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes); "" when it does not exist."""
    path = Path(path)
    if not str(path) or not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def folder_identity(pretrained: str | Path) -> str:
    """Cheap identity of a local model folder (names, sizes, mtimes of its files); a hub id as given."""
    folder = Path(pretrained)
    if not folder.is_dir():
        return str(pretrained)
    stats = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


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
