"""Errors a user can act on: one family, printed by the CLI as one `vidcap: error: ...` line.

Everything else that escapes a command is a bug in vidcap and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error whose message tells the user what to fix; the CLI prints it without a traceback."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the source."""


class AnnotationError(UserError, ValueError):
    """Malformed annotations; the message names the file, the record and what is wrong."""


class StageError(UserError, RuntimeError):
    """A stage cannot run (its inputs are missing, or its finished outputs would be overwritten)."""


class StoreError(UserError, RuntimeError):
    """The feature store is missing, inconsistent with the request, or a video in it is not done."""


class FingerprintMismatch(UserError, ValueError):
    """The store was written with other settings than the config asks for."""

    def __init__(self, path: str | Path, differences: list[str]):
        self.path = str(path)
        self.differences = differences
        super().__init__(
            f"feature store {path} was written with other settings:\n  "
            + "\n  ".join(differences)
            + "\nre-extract into another cache.path, or create it again with overwrite=True"
        )

    def __reduce__(self):  # keep (path, differences) when pickled across Dask workers
        return (type(self), (self.path, self.differences))


class VideoDecodeError(UserError, RuntimeError):
    """A video could not be read: missing, empty, corrupt, not a video, no frames, decoder failure."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) when pickled across Dask workers
        return (type(self), (self.path, self.reason))


class DiskFullError(UserError, RuntimeError):
    """A write failed because the disk (or the user's quota) is full; names the file and the free space."""

    def __init__(self, path: str | Path, free: int | None) -> None:
        self.path = str(path)
        self.free = free
        room = "unknown" if free is None else _size(free)
        super().__init__(
            f"no space left on the device writing {self.path} ({room} free there); free some space and re-run to resume"
        )

    def __reduce__(self):  # keep (path, free) when pickled across Dask workers
        return (type(self), (self.path, self.free))


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


class JavaNotFoundError(UserError, RuntimeError):
    """The coco-caption tokenizer and METEOR need a Java runtime and none is on PATH."""

    def __init__(self) -> None:
        super().__init__(
            "java was not found on PATH, and the coco-caption metrics need it (the PTB tokenizer "
            "and METEOR are Java programs). Install a Java runtime, e.g. "
            "`apt-get install default-jre-headless` (Debian/Ubuntu) or "
            "`conda install -c conda-forge openjdk`, and check that `java -version` works."
        )
