"""One writer per output: an advisory lock file beside each store, stage folder and caption OUT.

    with output_lock(config.cache_path, "feature store"):
        ...  # only this process writes the store

The lock is `flock` on `.<name>.lock` in the same folder as the output. The kernel releases
it when the holder's file is closed, which includes the holder being killed (SIGKILL, OOM,
a lost node on a local filesystem): a lock left by a dead process is never in the way, so
there is no staleness to guess from timestamps. The file stays behind (removing it would race
with a second process opening it); its content names the holder for the refusal message.

Within one process the lock is re-entrant (a stage that re-opens its own folder does not lock
itself out); `release` drops one level.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError


class OutputLocked(UserError, RuntimeError):
    """Another live process is writing the same output."""

    def __init__(self, path: str | Path, what: str, holder: str):
        self.path, self.what, self.holder = str(path), what, holder
        super().__init__(
            f"{what} {path} is being written by another process ({holder}); "
            "wait for it to finish, or write somewhere else"
        )

    def __reduce__(self):
        return (type(self), (self.path, self.what, self.holder))


_held: dict[Path, list] = {}  # lock file -> [open file, depth]
_guard = threading.Lock()


def lock_path(output: str | Path) -> Path:
    """`.<name>.lock` beside `output`."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.lock"


def acquire(output: str | Path, what: str = "output") -> Path:
    """Take the lock of `output` for this process, or raise `OutputLocked` naming the holder."""
    path = lock_path(output)
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 (held open for as long as the lock is)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise OutputLocked(output, what, holder) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}\n")
        f.flush()
        _held[path] = [f, 1]
        return path


def release(output: str | Path, all_levels: bool = False) -> None:
    """Drop one level (or `all_levels`) of this process's lock on `output`; the last closes the file."""
    path = lock_path(output)
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] = 0 if all_levels else entry[1] - 1
        if entry[1] <= 0:
            del _held[path]
            entry[0].close()  # closing releases the flock


@contextlib.contextmanager
def output_lock(output: str | Path, what: str = "output") -> Iterator[Path]:
    """`acquire` ... `release` around a block."""
    path = acquire(output, what)
    try:
        yield path
    finally:
        release(output)
