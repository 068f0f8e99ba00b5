"""Which videos a command names: files, folders, globs and manifests, expanded in order, each once.

    vidcap caption videos/ more/*.mp4 list.txt clips.csv manifest.jsonl --model ... --out ...

Folders are searched recursively for video extensions; globs may use `**`; manifests are our
JSONL (`video` or `video_id` per line), a CSV with a `path` (or `video`) column, or a `.txt`
list of paths, and relative paths in a manifest start from its folder. A file that is not a
video is kept: captioning records an error for it instead of silently dropping it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.annotations import AnnotationError

VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
    ".3gp",
    ".ts",
)
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".txt", ".lst")


@dataclass(frozen=True)
class VideoInput:
    """One video to caption."""

    video: str
    """Absolute path of the video (the record's key)."""
    video_id: str = ""
    """Id from a manifest, copied into the record."""


def expand_inputs(inputs: list[str], log: Any = None) -> list[VideoInput]:
    """The videos that files, folders, globs and manifests name, in order, each once."""
    items: dict[str, VideoInput] = {}
    for spec in inputs:
        found = list(_expand(spec))
        if not found and log is not None:
            log.warning("caption: %s matches no video", spec)
        for item in found:
            items.setdefault(item.video, item)
    return list(items.values())


def _expand(spec: str) -> Iterator[VideoInput]:
    path = Path(spec).expanduser()
    if path.is_dir():
        yield from _folder(path)
    elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        yield from read_manifest(path)
    elif not path.exists() and glob.has_magic(spec):
        for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
            if os.path.isdir(match):
                yield from _folder(Path(match))
            elif match.lower().endswith(VIDEO_EXTENSIONS):
                yield VideoInput(os.path.abspath(match))
    else:  # a video, or a file that will get an error record (missing, not a video)
        yield VideoInput(os.path.abspath(path))


def _folder(folder: Path) -> Iterator[VideoInput]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(VIDEO_EXTENSIONS):
                yield VideoInput(os.path.abspath(os.path.join(root, name)))


def read_manifest(path: Path) -> Iterator[VideoInput]:
    """Videos of a JSONL (`video` or `video_id`), CSV (`path` or `video` column) or text list."""

    root = path.parent
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            reader = csv.DictReader(f)
            column = next(
                (c for c in ("path", "video", "video_path") if c in (reader.fieldnames or [])), None
            )
            if column is None:
                raise AnnotationError(f"{path}: needs a `path` or `video` column; it has {reader.fieldnames}")
            for row in reader:
                if row[column]:
                    yield VideoInput(_absolute(root, row[column]), row.get("video_id") or "")
        elif suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    video = row.get("video") or row.get("path") or row["video_id"] + ".mp4"
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise AnnotationError(
                        f"{path}:{number}: expected a JSON object with `video` or `video_id`"
                    ) from None
                yield VideoInput(_absolute(root, video), str(row.get("video_id") or ""))
        else:
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    yield VideoInput(_absolute(root, line.strip()))


def _absolute(root: Path, video: str) -> str:
    return os.path.abspath(os.path.join(root, os.path.expanduser(video)))
