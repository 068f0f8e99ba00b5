"""Annotation readers: every dataset format becomes one `Manifest` of `VideoRecord`s.

A stage never reads a dataset's own files; it asks `load_manifest(config.data)` for an ordered
list of videos (id, resolved path, split, raw reference captions). Formats (`data.format`):

* ``jsonl`` (ours): one JSON object per line,
  ``{"video_id": "v1", "video": "clips/v1.mp4", "split": "train", "captions": ["...", ...]}``.
  ``video`` is optional (default ``<video_id><video_ext>``); ``captions`` may be empty or
  absent for unlabelled videos; blank lines and unknown keys are ignored.
* ``msrvtt``: the official ``{"videos": [{"video_id", "split"}], "sentences": [{"video_id",
  "caption"}]}``; split ``validate`` becomes ``val``; path ``<video_root>/<video_id><video_ext>``.
  The 2016 release is two such files (``train_val_videodatainfo.json``,
  ``test_videodatainfo.json``): give both as a list, or their folder; see `read_msrvtt`.
* ``lavis`` / ``msvd`` (MSVD as LAVIS distributes it): a folder of ``cap_<split>.json`` files,
  see `read_lavis`.
* ``vatex``: a JSON list of ``{"videoID", "enCap": [...]}``; one file per split, the split read
  from the file name (or given: ``data.annotations_split``), or a folder of such files; see
  `read_vatex`.
* ``captions_jsonl``: what `vidcap caption` writes, one captioned video per line, as a training
  set of pseudo-labels (split ``train``), optionally filtered by confidence; see `read_captions_jsonl`.

Every manifest remembers, per split, the files its reference captions were looked for in
(`Manifest.searched`), so that `require_references` can stop a split that has videos but no
references before anything is captioned, saying where it looked.

Relative video paths are resolved against ``video_root``, or, when it is empty, against the
folder holding the annotation file. Malformed input raises `AnnotationError` naming the file,
the record and the problem; a missing video file is not an error here (`find_missing_videos`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.errors import AnnotationError
from pipeline.runtime.files import read_text_file

if TYPE_CHECKING:
    from pipeline.config import DataConfig

FORMATS = ("jsonl", "msrvtt", "lavis", "msvd", "vatex", "captions_jsonl")
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class VideoRecord:
    video_id: str
    path: str
    """Absolute path of the video file (it may not exist; see `find_missing_videos`)."""
    split: str
    captions: tuple[str, ...] = ()
    """Raw reference captions, as written in the annotations (empty for unlabelled videos)."""


class Manifest:
    """The videos of a dataset in annotation order; video ids are unique."""

    def __init__(
        self,
        records: Iterable[VideoRecord],
        source: str = "<manifest>",
        searched: dict[str, list[str]] | None = None,
    ):
        self.records = list(records)
        self.source = source
        self.searched = searched or {}
        """{split: [files its reference captions were looked for in]} (empty: `source`)."""
        self._index: dict[str, int] = {}
        for i, record in enumerate(self.records):
            first = self._index.setdefault(record.video_id, i)
            if first != i:
                raise AnnotationError(
                    f"{source}: duplicate video_id {record.video_id!r} (records {first} and {i}, "
                    f"splits {self.records[first].split!r} and {record.split!r})"
                )

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[VideoRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={len(self.split(s))}" for s in self.splits())
        return f"Manifest({self.source}: {counts})"

    def splits(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(r.split for r in self.records))

    def split(self, name: str) -> list[VideoRecord]:
        """The records of one split; an unknown split is an error (it is usually a typo)."""
        if name not in self.splits():
            raise AnnotationError(f"{self.source}: no split {name!r}; splits are {self.splits()}")
        return [r for r in self.records if r.split == name]

    def get(self, video_id: str) -> VideoRecord:
        try:
            return self.records[self._index[video_id]]
        except KeyError:
            raise KeyError(f"{self.source}: no video {video_id!r}") from None

    def references(self, split: str) -> dict[str, list[str]]:
        """``{video_id: [raw captions]}`` of one split, the shape caption scorers take."""
        return {r.video_id: list(r.captions) for r in self.split(split)}

    def to_jsonl(self, path: str | Path) -> None:
        """Write the manifest in our ``jsonl`` format (absolute paths), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in self.records:
                row = {
                    "video_id": r.video_id,
                    "video": r.path,
                    "split": r.split,
                    "captions": list(r.captions),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def read_annotations(
    fmt: str,
    annotations: str | Path | Sequence[str | Path],
    video_root: str | Path = "",
    video_ext: str = ".mp4",
    split: str = "",
) -> Manifest:
    """Read annotations of format `fmt` (one of `FORMATS`) into a `Manifest`.

    `annotations` is a file or a folder, or (msrvtt, vatex) a list of files read as one dataset.
    `split` names the split of a single VATEX file whose name does not say it.
    """
    readers = {
        "jsonl": read_jsonl,
        "msrvtt": read_msrvtt,
        "lavis": read_lavis,
        "msvd": read_lavis,
        "vatex": read_vatex,
        "captions_jsonl": read_captions_jsonl,
    }
    if fmt not in readers:
        raise AnnotationError(f"unknown annotation format {fmt!r}; choose from {', '.join(FORMATS)}")
    given = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
    if not given or not all(str(p) for p in given):
        raise AnnotationError(f"no annotations given for format {fmt!r} (set data.annotations)")
    paths = [Path(p).expanduser() for p in given]
    for path in paths:
        if not path.exists():
            raise AnnotationError(f"{path}: annotations not found")
    if split and fmt != "vatex":
        raise AnnotationError(f"data.annotations_split ({split!r}) applies to format vatex only, not {fmt!r}")
    if fmt == "msrvtt":
        return read_msrvtt(paths if len(paths) > 1 else paths[0], video_root, video_ext)
    if fmt == "vatex":
        if len(paths) > 1 and split:
            raise AnnotationError(
                f"data.annotations_split ({split!r}) names the split of one file; got {len(paths)} files"
            )
        return read_vatex(paths if len(paths) > 1 else paths[0], video_root, video_ext, split=split)
    if len(paths) > 1:
        raise AnnotationError(
            f"format {fmt!r} reads one file or folder, got a list: {', '.join(map(str, paths))}"
        )
    return readers[fmt](paths[0], video_root, video_ext)


def require_references(manifest: Manifest, split: str) -> None:
    """Stop when `split` has videos but not one reference caption, naming where they were looked for."""
    records = manifest.split(split)
    if records and not any(caption.strip() for r in records for caption in r.captions):
        searched = manifest.searched.get(split) or [manifest.source]
        raise AnnotationError(
            f"{manifest.source}: split {split!r} has {len(records)} videos but no reference captions; "
            f"looked in: {', '.join(searched)}"
        )


def load_manifest(data: DataConfig) -> Manifest:
    """The manifest a config's ``data`` section describes, with ``data.max_videos`` applied per split."""
    manifest = read_annotations(
        data.format, data.annotations, data.video_root, data.video_ext, split=data.annotations_split
    )
    if data.max_videos <= 0:
        return manifest
    kept: list[VideoRecord] = []
    for name in manifest.splits():
        kept += manifest.split(name)[: data.max_videos]
    order = {r.video_id: i for i, r in enumerate(manifest.records)}
    kept.sort(key=lambda r: order[r.video_id])
    return Manifest(kept, f"{manifest.source} (first {data.max_videos} per split)", manifest.searched)


def find_missing_videos(records: Iterable[VideoRecord]) -> dict[str, str]:
    """``{video_id: reason}`` for every record whose video file is absent or empty."""
    missing = {}
    for r in records:
        path = Path(r.path)
        if not path.exists():
            missing[r.video_id] = f"file not found: {path}"
        elif not path.is_file():
            missing[r.video_id] = f"not a file: {path}"
        elif path.stat().st_size == 0:
            missing[r.video_id] = f"empty file: {path}"
    return missing


# ---------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------


def read_jsonl(path: Path, video_root: str | Path = "", video_ext: str = ".mp4") -> Manifest:
    """Our generic format: one ``{"video_id", "video", "split", "captions"}`` object per line."""
    root = _root(path, video_root)
    records, seen = [], {}
    with _readable(path):
        lines = read_text_file(path).split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}:{number}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            _fail(path, where, f"expected a JSON object, got {type(row).__name__}")
        video_id = _string(row, "video_id", path, where)
        where = f"line {number} (video_id {video_id!r})"
        if video_id in seen:
            _fail(path, where, f"duplicate video_id (first on line {seen[video_id]})")
        seen[video_id] = number
        split = _string(row, "split", path, where)
        video = _string(row, "video", path, where) if "video" in row else video_id + video_ext
        captions = _captions(row.get("captions") or [], path, where + " captions")
        records.append(VideoRecord(video_id, _resolve(root, video), split, captions))
    return Manifest(records, str(path), {r.split: [str(path)] for r in records})


def read_captions_jsonl(
    path: Path,
    video_root: str | Path = "",
    video_ext: str = ".mp4",
    score: str = "confidence",
    min_confidence: float = 0.0,
    top_fraction: float = 1.0,
) -> Manifest:
    """What `vidcap caption` writes, as a training set: one ``{"video", "caption", ...}`` per line.

    Each captioned record becomes a video of split ``train`` with its one caption; the id is the
    record's ``video_id``, else its ``video`` path. Error records and torn lines are skipped.
    Filter: keep records whose `score` field (``confidence``, ``beam_agreement``) is at least
    `min_confidence`, then the `top_fraction` best of those (ties broken by file order).
    """
    root = _root(path, video_root)
    kept: list[tuple[float, int, VideoRecord]] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue  # a torn last line: its video was not finished
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{number}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict) or "error" in row:
                continue
            where = f"line {number}"
            if "window" in row:
                _fail(path, where, "captions of windows cannot be a training set (caption whole videos)")
            video = _string(row, "video", path, where)
            video_id = str(row.get("video_id") or video)
            caption = _string(row, "caption", path, f"{where} (video {video!r})")
            if video_id in seen:
                _fail(path, where, f"duplicate video {video_id!r} (first on line {seen[video_id]})")
            seen[video_id] = number
            value = row.get(score)
            if not isinstance(value, (int, float)):
                if min_confidence > 0 or top_fraction < 1:
                    _fail(path, where, f"no {score!r} to filter by (caption it with this version of vidcap)")
                value = 0.0
            if value >= min_confidence:
                kept.append(
                    (float(value), number, VideoRecord(video_id, _resolve(root, video), "train", (caption,)))
                )
    if top_fraction < 1:
        kept.sort(key=lambda k: (-k[0], k[1]))
        kept = sorted(kept[: round(len(kept) * top_fraction)], key=lambda k: k[1])
    return Manifest([record for _, _, record in kept], str(path))


MSRVTT_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def msrvtt_files(path: Path | Sequence[Path]) -> list[Path]:
    """The MSR-VTT files to read: the list given, or a folder's ``*videodatainfo*.json`` (the 2016
    release: ``train_val_videodatainfo.json`` and ``test_videodatainfo.json``), else its ``*.json``."""
    if not isinstance(path, Path):
        return list(path)
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*videodatainfo*.json")) or sorted(path.glob("*.json"))
    if not files:
        raise AnnotationError(
            f"{path}: no MSR-VTT annotation files in this folder (expected train_val_videodatainfo.json "
            "and test_videodatainfo.json)"
        )
    return files


def read_msrvtt(
    path: Path | Sequence[Path], video_root: str | Path = "", video_ext: str = ".mp4"
) -> Manifest:
    """The official MSR-VTT JSON, one file, a list of files or a folder (`msrvtt_files`); split
    ``validate`` is renamed ``val``. A video listed in two files is an error naming both."""
    files = msrvtt_files(path)
    videos: dict[str, tuple[str, list[str], Path]] = {}  # video_id -> (split, captions, file)
    sentences: list[tuple[Path, int, Any]] = []
    for file in files:
        data = _load_json(file)
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
            _fail(file, "top level", 'expected an object with a "videos" list and a "sentences" list')
        rows = data.get("sentences", [])
        if not isinstance(rows, list):
            _fail(file, "sentences", f"expected a list, got {type(rows).__name__}")
        _msrvtt_videos(file, data["videos"], videos)
        sentences += [(file, i, row) for i, row in enumerate(rows)]
    for file, i, sentence in sentences:
        where = f"sentences[{i}]"
        if not isinstance(sentence, dict):
            _fail(file, where, f"expected an object, got {type(sentence).__name__}")
        video_id = _string(sentence, "video_id", file, where)
        caption = sentence.get("caption")
        if not isinstance(caption, str):
            _fail(file, f"{where} (video_id {video_id!r})", f"caption must be a string, got {caption!r}")
        if video_id not in videos:
            _fail(file, where, f"video_id {video_id!r} is not in the videos list")
        videos[video_id][1].append(caption)
    root = _root(files[0], video_root)
    records = [
        VideoRecord(vid, _resolve(root, vid + video_ext), split, tuple(caps))
        for vid, (split, caps, _) in videos.items()
    ]
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    records.sort(key=lambda r: rank.get(r.split, len(rank)))  # stable: file order within a split
    source = str(path) if isinstance(path, Path) else ", ".join(map(str, files))
    return Manifest(records, source, {r.split: [str(f) for f in files] for r in records})


def _msrvtt_videos(file: Path, rows: list, videos: dict[str, tuple[str, list[str], Path]]) -> None:
    for i, video in enumerate(rows):
        where = f"videos[{i}]"
        if not isinstance(video, dict):
            _fail(file, where, f"expected an object, got {type(video).__name__}")
        video_id = _string(video, "video_id", file, where)
        where += f" (video_id {video_id!r})"
        split = _string(video, "split", file, where)
        if split not in MSRVTT_SPLITS:
            _fail(file, where, f"unknown split {split!r}; expected one of {', '.join(MSRVTT_SPLITS)}")
        if video_id in videos:
            first = videos[video_id][2]
            _fail(file, where, "duplicate video_id" + (f" (also in {first})" if first != file else ""))
        videos[video_id] = (MSRVTT_SPLITS[split], [], file)


def lavis_gt_candidates(folder: Path, split: str) -> list[Path]:
    """Where `read_lavis` looks for the COCO-style ground truth of `split`, first match wins.

    1. ``<folder>/cap_<split>_gt.json`` (our convention, what `pipeline.demo.synth` writes);
    2. ``<folder>/msrvtt_<split>_gt.json``, ``<folder>/msvd_<split>_gt.json``;
    3. ``msrvtt_gt/msrvtt_<split>_gt.json`` and ``msvd_gt/msvd_<split>_gt.json`` in the folder's
       parent and grandparent: the method's LAVIS fork keeps them in ``<cache>/msrvtt_gt/`` beside
       ``<cache>/msrvtt/annotations/`` (the names its caption evaluation opens);
    4. ``<ds>_gt/<ds>_<split>_annotations.json`` for any dataset name ``<ds>`` in the folder, its
       parent and grandparent: what current LAVIS writes (``msvd_cap_gt/msvd_cap_test_annotations.json``).

    Where several datasets' files exist (a shared LAVIS cache), the ones whose dataset name
    occurs in the folder's path come first.
    """
    names = [folder / f"cap_{split}_gt.json"] + [
        folder / f"{ds}_{split}_gt.json" for ds in ("msrvtt", "msvd")
    ]
    for parent in (folder.parent, folder.parent.parent):
        names += [parent / f"{ds}_gt" / f"{ds}_{split}_gt.json" for ds in ("msrvtt", "msvd")]
    for parent in (folder, folder.parent, folder.parent.parent):
        names += sorted(
            gt / f"{gt.name[:-3]}_{split}_annotations.json" for gt in parent.glob("*_gt") if gt.is_dir()
        )
    words = {part.lower() for part in folder.resolve().parts}
    return sorted(names, key=lambda p: _dataset_of(p) not in words | {""})  # stable: else the order above


def _dataset_of(gt_file: Path) -> str:
    """``msrvtt`` of ``.../msrvtt_gt/...`` or ``msrvtt_test_gt.json``; ``""`` for ``cap_*``."""
    name = gt_file.parent.name if gt_file.parent.name.endswith("_gt") else gt_file.name
    return "" if name.startswith("cap_") else name.split("_")[0].lower()


def read_lavis(folder: Path, video_root: str | Path = "", video_ext: str = ".mp4") -> Manifest:
    """LAVIS caption annotations (MSR-VTT, MSVD): a folder of ``cap_<split>.json`` files.

    Each ``cap_<split>.json`` is a list of rows ``{"video": "video7010.mp4", "image_id": ...,
    "caption": ...}``: training files hold one row per caption (rows grouped by video), val/test
    files one row per video and often no caption. ``caption`` may be a string or a list. The
    video id is the ``video`` file name without its extension (``video_id`` + ``video_ext`` when
    a row has no ``video``). Splits are read in the order train, val, test, then others.

    Reference captions come from the split's COCO-style ground truth
    ``{"annotations": [{"image_id", "caption", "id"}], "images": [{"id"}]}`` when one exists
    (see `lavis_gt_candidates` for the exact names and the order they are tried in), joined on
    the rows' ``image_id`` or, failing that, on the video id; otherwise from the rows' own
    captions (none: unlabelled videos). A ground-truth caption that matches no video is an error.
    """
    if not folder.is_dir():
        raise AnnotationError(
            f"{folder}: the lavis/msvd format expects a folder holding cap_<split>.json files"
        )
    files = [p for p in folder.glob("cap_*.json") if not p.name.endswith("_gt.json")]
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    files.sort(key=lambda p: (rank.get(p.stem[4:], len(rank)), p.name))
    if not files:
        raise AnnotationError(
            f"{folder}: no cap_<split>.json files (expected cap_train.json, cap_val.json, ...)"
        )
    root = _root(folder / "x", video_root)
    records, searched = [], {}
    for file in files:
        split = file.stem[4:]
        videos = _lavis_rows(file, video_ext)
        candidates = lavis_gt_candidates(folder, split)
        gt = next((p for p in candidates if p.is_file()), None)
        if gt is not None:
            _join_ground_truth(gt, videos, file)
        searched[split] = [str(p) for p in candidates] + [str(file)]
        for video_id, (video, _, captions) in videos.items():
            records.append(VideoRecord(video_id, _resolve(root, video), split, tuple(captions)))
    return Manifest(records, str(folder), searched)


def _lavis_rows(file: Path, video_ext: str) -> dict[str, tuple[str, set[str], list[str]]]:
    """``{video_id: (video file, {image ids as str}, [row captions])}`` in order of first appearance."""
    rows = _load_json(file)
    if not isinstance(rows, list):
        _fail(file, "top level", f"expected a list of rows, got {type(rows).__name__}")
    videos: dict[str, tuple[str, set[str], list[str]]] = {}
    for i, row in enumerate(rows):
        where = f"row {i}"
        if not isinstance(row, dict):
            _fail(file, where, f"expected an object, got {type(row).__name__}")
        if "video" in row:
            video = _string(row, "video", file, where)
        else:
            video = _string(row, "video_id", file, where + ' (no "video")') + video_ext
        video_id = Path(video).stem
        where += f" (video {video!r})"
        entry = videos.setdefault(video_id, (video, set(), []))
        if entry[0] != video:
            _fail(file, where, f"video id {video_id!r} also names the file {entry[0]!r}")
        if row.get("image_id") is not None:
            entry[1].add(str(row["image_id"]))
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, (str, list)):
            _fail(file, where, f"caption must be a string or a list of strings, got {caption!r}")
        if caption is not None:
            entry[2].extend(
                _captions([caption] if isinstance(caption, str) else caption, file, where + " caption")
            )
    return videos


def _join_ground_truth(gt: Path, videos: dict[str, tuple[str, set[str], list[str]]], rows_file: Path) -> None:
    """Replace each video's captions by those of the ground truth file `gt`."""
    data = _load_json(gt)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        _fail(gt, "top level", 'expected a COCO-style object with an "annotations" list')
    by_key: dict[str, str] = {}
    for video_id, (_, image_ids, captions) in videos.items():
        captions.clear()
        for key in image_ids | {video_id}:
            by_key.setdefault(key, video_id)
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            _fail(gt, where, 'expected an object with "image_id" and "caption"')
        where += f" (image_id {ann['image_id']!r})"
        caption = ann.get("caption")
        if not isinstance(caption, str):
            _fail(gt, where, f"caption must be a string, got {caption!r}")
        video_id = by_key.get(str(ann["image_id"]))
        if video_id is None:
            _fail(gt, where, f"image_id matches no image_id or video of {rows_file.name}")
        videos[video_id][2].append(caption)


VATEX_SPLITS = (
    ("training", "train"),
    ("validation", "val"),
    ("public_test", "test"),
    ("private_test", "private_test"),
)


def vatex_split(file: Path) -> str:
    """The split a VATEX file holds, from its name: ``vatex_training*`` -> train, etc."""
    name = file.name.lower()
    for key, split in VATEX_SPLITS:
        if key in name:
            return split
    raise AnnotationError(
        f"{file}: cannot tell the split from the file name; expected it to contain "
        "'training' (train), 'validation' (val), 'public_test' (test) or 'private_test' (private_test), "
        "like the official files, or set data.annotations_split"
    )


def read_vatex(
    path: Path | Sequence[Path], video_root: str | Path = "", video_ext: str = ".mp4", split: str = ""
) -> Manifest:
    """VATEX: ``[{"videoID": "<youtube id>_<start>_<end>", "enCap": [10 captions], ...}]``.

    `path` is one file (``vatex_training_v1.0.json``, ``vatex_validation_v1.0.json``,
    ``vatex_public_test_english_v1.1.json``; the split comes from the name, see `vatex_split`)
    or a folder whose ``*.json`` files are all read, in split order. The English captions
    ``enCap`` are the references (absent: unlabelled); the unlabelled private test file
    (``vatex_private_test_without_annotations.json``) becomes the split ``private_test``.
    The video is ``<video_root>/<videoID><video_ext>``. `split` (``data.annotations_split``)
    names the split of one file whose name does not say it; a list of files is read as one.
    """
    if not isinstance(path, Path):
        files = list(path)
    elif path.is_dir():
        if split:
            raise AnnotationError(
                f"{path}: data.annotations_split ({split!r}) names the split of one file, not of a folder"
            )
        files = sorted(path.glob("*.json"))
    else:
        files = [path]
    if not files:
        raise AnnotationError(f"{path}: no VATEX *.json files in this folder")
    splits = {f: split or vatex_split(f) for f in files}
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    files.sort(key=lambda f: rank.get(splits[f], len(rank)))
    records, searched = [], {}
    for file in files:
        split_of_file, root = splits[file], _root(file, video_root)
        searched.setdefault(split_of_file, []).append(str(file))
        rows = _load_json(file)
        if not isinstance(rows, list):
            _fail(file, "top level", f"expected a list of videos, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                _fail(file, f"row {i}", f"expected an object, got {type(row).__name__}")
            video_id = _string(row, "videoID", file, f"row {i}")
            captions = _captions(row.get("enCap") or [], file, f"row {i} (videoID {video_id!r}) enCap")
            records.append(
                VideoRecord(video_id, _resolve(root, video_id + video_ext), split_of_file, captions)
            )
    return Manifest(records, str(path) if isinstance(path, Path) else ", ".join(map(str, files)), searched)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _fail(file: Path, where: str, what: str) -> NoReturn:
    raise AnnotationError(f"{file}: {where}: {what}")


def _load_json(file: Path) -> Any:
    try:
        with _readable(file):
            return json.loads(read_text_file(file))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None


@contextlib.contextmanager
def _readable(file: Path) -> Iterator[None]:
    """An OSError reading `file` (missing, a folder, no permission) as an AnnotationError naming it."""
    try:
        yield
    except OSError as e:
        raise AnnotationError(f"{file}: cannot read: {e.strerror}") from None


def _string(row: dict, key: str, file: Path, where: str) -> str:
    value = row.get(key)
    if key not in row:
        _fail(file, where, f"missing key {key!r}")
    if not isinstance(value, str) or not value:
        _fail(file, where, f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _captions(values: Any, file: Path, where: str) -> tuple[str, ...]:
    if not isinstance(values, list):
        _fail(file, where, f"expected a list of strings, got {type(values).__name__}")
    for j, caption in enumerate(values):
        if not isinstance(caption, str):
            _fail(file, f"{where}[{j}]", f"caption must be a string, got {caption!r}")
    return tuple(values)


def _root(annotation_file: Path, video_root: str | Path) -> Path:
    """Folder relative video paths start from: `video_root`, else the annotation file's folder."""
    return Path(video_root) if str(video_root) else annotation_file.parent


def _resolve(root: Path, video: str) -> str:
    return os.path.abspath(os.path.join(root, video))
