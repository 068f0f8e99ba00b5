"""Content hashes of files and model folders: what a result was made from, independent of paths.

A model folder is identified by the bytes of its weights, configs and tokenizer files, so a
folder that is moved keeps its identity and one whose files are replaced gets a new one.
Hashing a large model takes a while (SHA-256 reads about 1 GB/s), so the digest of each big
file is remembered in `~/.cache/vidcap/file_hashes.json` (or `$VIDCAP_CACHE/...`) under its
absolute path, size and modification time, and only a changed file is read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from pipeline.runtime.files import atomic_write_json

# Files that decide what a model computes: weights, configs, tokenizer vocabularies.
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".pt", ".pth")
MEMO_MIN_BYTES = 64 << 20  # smaller files are cheaper to read again than to look up
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path, suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> str:
    """Hex SHA-256 over the (relative path, content hash) of every file under `folder` with one of
    `suffixes`, in sorted order: the identity of a model folder wherever it lies."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    memo = _Memo()
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}:{memo.sha256(path)};".encode())
    memo.save()
    return digest.hexdigest()


class _Memo:
    """Digests of big files by (absolute path, size, mtime), kept between runs."""

    def __init__(self) -> None:
        root = os.environ.get("VIDCAP_CACHE") or Path.home() / ".cache" / "vidcap"
        self.path = Path(root) / "file_hashes.json"
        self.entries: dict[str, str] = {}
        self.changed = False
        with contextlib.suppress(OSError, ValueError):
            self.entries = dict(json.loads(self.path.read_text()))

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        if stat.st_size < MEMO_MIN_BYTES:
            return file_sha256(path)
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.entries:
            self.entries[key] = file_sha256(path)
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if self.changed:
            with contextlib.suppress(OSError):  # a read-only home only costs the next run a re-read
                atomic_write_json(self.path, self.entries)
