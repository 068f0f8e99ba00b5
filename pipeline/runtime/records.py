"""JSONL result files that many workers append to and any kill can cut: part files, merged.

Each task appends to its own part file, one batch at a time, flushed and fsynced, so no two
writers share a file and a kill loses at most the batches in flight (and may tear the last
line, which readers skip). `merge_parts` appends to OUT the records it lacks, in input order,
then deletes the parts; a kill during the merge leaves them for the next merge, and a torn
last line of OUT is cut off first. A record's key is its `video` (and `start`, for windows).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.runtime.files import disk_full_names
from pipeline.runtime.locks import output_lock


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete JSON records of a JSONL file; a torn or garbled line is skipped."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn by a kill: its video was not finished
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "video" in record:
                yield record


def record_key(record: dict[str, Any]) -> tuple[str, Any]:
    return record["video"], record.get("start")


def recorded_videos(out: Path) -> set[str]:
    """Videos OUT holds completely (every window of a windowed video)."""
    return {video for video, _ in _complete(list(read_records(out)))}


def _complete(records: list[dict[str, Any]]) -> dict[tuple[str, Any], dict[str, Any]]:
    """Records by key, first one wins, dropping windowed videos that miss some windows.

    A video that failed part-way through its windows has an error record besides the windows
    before the failure: the error record alone stands for it.
    """
    failed: dict[str, dict[str, Any]] = {}
    for record in records:
        if "error" in record:
            failed.setdefault(record["video"], record)
    by_key: dict[tuple[str, Any], dict[str, Any]] = {}
    for record in records:
        if record["video"] in failed:
            record = failed[record["video"]]
        by_key.setdefault(record_key(record), record)
    windows: dict[str, set[Any]] = {}
    expected: dict[str, int] = {}
    for (video, start), record in by_key.items():
        windows.setdefault(video, set()).add(start)
        expected[video] = max(expected.get(video, 1), int(record.get("windows", 1)))
    incomplete = {video for video, starts in windows.items() if len(starts) < expected[video]}
    return {key: r for key, r in by_key.items() if key[0] not in incomplete}


def merge_parts(out: Path, parts: Path, order: list[str]) -> int:
    """Append the part files' records that OUT lacks to OUT (in `order`), then delete the parts."""
    if not parts.is_dir():
        return 0
    files = sorted(parts.glob("*.jsonl"))
    present = list(read_records(out))
    # Keys already in OUT are never appended again, even of a windowed video that OUT holds only
    # in part (a kill during the append below): the parts complete it with the missing windows.
    have = {record_key(r) for r in present}
    merged = _complete(present + [r for f in files for r in read_records(f)])
    rank = {video: i for i, video in enumerate(order)}
    new = [r for key, r in merged.items() if key not in have]
    new.sort(key=lambda r: (rank.get(r["video"], len(rank)), r.get("start") or 0.0))
    if new:
        _cut_torn_tail(out)
        with disk_full_names(out), out.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
            f.flush()
            os.fsync(f.fileno())
    for file in files:
        file.unlink()
    with contextlib.suppress(OSError):
        parts.rmdir()
    return len(new)


def drop_error_records(out: Path) -> int:
    """Rewrite OUT without its `error` records (so their videos count as not done); returns how many.

    The other lines are kept byte for byte and in order. The new file replaces OUT atomically,
    so a kill leaves either the old OUT or the new one; it keeps OUT's permissions.
    """
    if not out.exists():
        return 0
    _cut_torn_tail(out)
    tmp = out.with_name(f".{out.name}.retry.tmp")
    dropped = 0
    with disk_full_names(out), out.open("rb") as src, tmp.open("wb") as dst:
        for line in src:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "error" in record:
                dropped += 1
                continue
            dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    if dropped:
        os.chmod(tmp, out.stat().st_mode & 0o7777)
        os.replace(tmp, out)
    else:
        tmp.unlink()
    return dropped


def _cut_torn_tail(path: Path) -> None:
    """Truncate a file to its last newline (a killed append can leave half a line)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        data_end = size
        step = 1 << 16
        while data_end > 0:
            start = max(0, data_end - step)
            f.seek(start)
            block = f.read(data_end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            data_end = start
        f.truncate(0)


@contextlib.contextmanager
def exclusive_writer(out: Path) -> Iterator[None]:
    """Refuse a second run writing the same OUT at the same time (`pipeline.runtime.locks`)."""
    with output_lock(out, "caption output"):
        yield
