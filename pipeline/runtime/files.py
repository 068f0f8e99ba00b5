"""Files that survive a kill: atomic replacement and fsync of files and folders; a full disk named."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import AnnotationError, DiskFullError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one (SIGKILL-safe).

    The file gets the mode any new file gets (0666 less the umask), as with `open(path, "w")`,
    not the 0600 of `mkstemp`: colleagues may read a shared run. A full disk raises `DiskFullError`
    and leaves the old file as it was.
    """
    path = Path(path)
    with disk_full_names(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so a rename in it survives a crash).

    A path that does not exist is skipped: zarr does not store an all-zero chunk.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """`fsync_path` on everything under `folder`, deepest first, then `folder` itself."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (`/proc/self/status`)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def free_bytes(path: str | Path) -> int | None:
    """Free space on the filesystem holding `path` (its nearest existing folder), or None."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_full_names(path: str | Path) -> Iterator[None]:
    """Turn a full disk met while writing `path` into a `DiskFullError` naming it and the free space.

    Python's writes raise OSError ENOSPC (or EDQUOT: quota); torch.save and safetensors raise their
    own errors, recognised by their text ("No space left", "StorageFull", or torch's "file write
    failed" with under 16 MB free).
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        where = getattr(e, "filename", None) or path
        free = free_bytes(where)
        if not is_disk_full(e, free):
            raise
        raise DiskFullError(where, free) from e


def is_disk_full(error: BaseException, free: int | None) -> bool:
    """Whether `error` says the disk (or quota) is full; see `disk_full_names`."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left on device" in text or "StorageFull" in text:
        return True
    return "file write failed" in text and free is not None and free < 16 << 20


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; bytes that are not UTF-8 are an `AnnotationError` naming the
    file, the line and the byte (a bare `UnicodeDecodeError` names neither)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise AnnotationError(
            f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
