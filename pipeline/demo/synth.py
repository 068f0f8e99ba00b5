"""The synthetic world: tiny encoded videos whose captions need both what and when.

Every video shows one big coloured shape (red/green/blue/yellow square/circle/triangle) on a
plain dark background, sliding in a straight line across the frame: left, right, up or down.
Any single frame shows the colour, the shape and the axis of motion (where the shape can be),
but not the direction: reversing the frames reverses the motion and changes only the
direction words of the captions (`order_words`). A model that sees frames as an unordered set
(the method's concatenation without temporal embeddings) can get at most half of those right.

    python -c "from pipeline.demo.synth import make_synthetic_world as m; print(m('data/synth'))"

writes, deterministically from the seed:

* ``videos/synth0000.mp4``, ...: real H.264 files (16 frames of 64x64 at 8 fps by default);
* ``annotations.jsonl``: our generic format (``video`` relative to ``videos/``) with the
  latent ``facts`` of each video (colour, shape, direction) for order-word accuracy;
* ``lavis/cap_{train,val,test}.json`` and ``lavis/cap_{val,test}_gt.json``: the same videos
  in LAVIS form (read with ``video_root`` = ``videos/``);
* questions about every video (`scene_questions`: its colour, shape, direction of motion, where
  it stops, how many corners it has), in ``annotations_qa.jsonl`` (the rows of
  ``annotations.jsonl`` plus a ``qa`` list: one manifest with captions and questions) and in
  LAVIS's video QA form, ``lavis/qa_{train,val,test}.json`` and ``lavis/train_ans2label.json``;
* ``summary.json``: the returned summary, written last (its presence means "complete").

Facts are balanced: every (colour, shape, direction) combination occurs once before any
occurs twice, so with the defaults (72 training videos, 48 combinations) the training split
holds all of them. Each video has five differently phrased captions from the same facts.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.video import write_video

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}
"""The axis of each direction: visible in any single frame, unlike the direction itself."""
"""Direction of travel: `right` is from the left edge to the right edge."""
BACKGROUND = (32, 32, 32)
SPLITS = ("train", "val", "test")

# (start side, end side) of each direction of travel.
_SIDES = {
    "right": ("left", "right"),
    "left": ("right", "left"),
    "down": ("top", "bottom"),
    "up": ("bottom", "top"),
}
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_END_TO_DIRECTION = {"left": "left", "right": "right", "top": "up", "bottom": "down"}

VERBS = ("moves", "slides", "travels", "goes")
TEMPLATES = (
    "a {color} {shape} {verb} from the {start} to the {end}",
    "a {color} {shape} is moving {direction}",
    "the {color} {shape} {verb} {direction} across the screen",
    "a {shape} that is {color} {verb} {direction}",
    "a {color} {shape} starts at the {start} and ends at the {end}",
)
"""One caption per template per video; `{verb}` is drawn from `VERBS` per caption."""


@dataclass(frozen=True)
class Scene:
    """The latent facts of one video plus the nuisance geometry (fractions of the frame side)."""

    color: str
    shape: str
    direction: str
    side: float = 0.3
    """Shape size: 0.25-0.34 of the frame (16-22 px at 64x64)."""
    cross: float = 0.5
    """Position across the motion axis, 0 (top/left) to 1 (bottom/right)."""
    inset: float = 0.0
    """How far (0-0.06) from the frame edges the motion starts and ends."""

    def facts(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "direction": self.direction}

    def reversed(self) -> Scene:
        """The same scene played backwards: only the direction changes."""
        return replace(self, direction=_OPPOSITE[self.direction])


def order_words() -> list[str]:
    """Caption words whose choice or position depends on frame order (not visible in one frame)."""
    return sorted({*DIRECTIONS, *(s for pair in _SIDES.values() for s in pair)})


def synth_vocabulary() -> list[str]:
    """Every word a synthetic caption can contain, sorted (a test tokenizer is built from it)."""
    words = set()
    for color, shape, direction, verb in itertools.product(COLORS, SHAPES, DIRECTIONS, VERBS):
        for template in TEMPLATES:
            words.update(_fill(template, Scene(color, shape, direction), verb).split())
    return sorted(words)


def _fill(template: str, scene: Scene, verb: str) -> str:
    start, end = _SIDES[scene.direction]
    return template.format(
        color=scene.color, shape=scene.shape, direction=scene.direction, start=start, end=end, verb=verb
    )


SYNTH_VOCAB = tuple(synth_vocabulary())
"""`synth_vocabulary()` as a constant."""


def scene_captions(scene: Scene, rng: np.random.Generator | None = None) -> list[str]:
    """Five reference captions of a scene (verbs drawn from `rng`; the first verb without one)."""
    verbs = [VERBS[int(rng.integers(len(VERBS)))] if rng is not None else VERBS[0] for _ in TEMPLATES]
    return [_fill(template, scene, verb) for template, verb in zip(TEMPLATES, verbs, strict=True)]


def parse_facts(caption: str) -> dict[str, str | None]:
    """Colour, shape and direction a caption states (None where it states none): for scoring.

    The direction is read from a direction word (``moving up``) or from the last of two side
    words (``from the left to the right`` -> right).
    """
    words = caption.lower().split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    direction = next((w for w in words if w in ("up", "down")), None)
    sides = [w for w in words if w in _END_TO_DIRECTION]
    if direction is None and sides:
        if len(sides) == 1 and sides[0] in ("left", "right"):
            direction = sides[0]
        elif len(sides) >= 2 and sides[-1] != sides[-2]:
            direction = _END_TO_DIRECTION[sides[-1]]
    return {"color": color, "shape": shape, "direction": direction}


CORNERS = {"square": "four", "triangle": "three", "circle": "zero"}
"""Answers to "how many corners": words, which the VQA normalisation scores as digits."""
QUESTIONS = (
    ("what colour is the object?", "color"),
    ("what shape is the object?", "shape"),
    ("which way does the object move?", "direction"),
    ("where does the object stop?", "end"),
    ("how many corners does the object have?", "corners"),
)
"""(question, the fact that answers it). Direction and end side need frame order; the rest do not."""


def scene_questions(scene: Scene) -> list[dict[str, str]]:
    """Every question of `QUESTIONS` about a scene with its one-word answer."""
    facts = {**scene.facts(), "end": _SIDES[scene.direction][1], "corners": CORNERS[scene.shape]}
    return [{"question": question, "answer": facts[fact]} for question, fact in QUESTIONS]


def question_fact(question: str) -> str:
    """Which fact a question of `QUESTIONS` asks for (for per-question accuracy)."""
    return dict(QUESTIONS)[question]


def write_world_qa(world_dir: str | Path) -> dict[str, str]:
    """Write the questions of an existing world (from the facts in its ``annotations.jsonl``).

    Deterministic and idempotent: a world written before questions existed gets them unchanged.
    """
    out = Path(world_dir)
    with (out / "annotations.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        row["qa"] = [
            {**qa, "question_id": f"{row['video_id']}_{j}"}
            for j, qa in enumerate(scene_questions(Scene(**row["scene"])))
        ]
    _write_json(out / "annotations_qa.jsonl", rows, lines=True)
    for split in SPLITS:
        qa_rows = [
            {
                "video": r["video"],
                "question": qa["question"],
                "answer": qa["answer"],
                "question_id": qa["question_id"],
            }
            for r in rows
            if r["split"] == split
            for qa in r["qa"]
        ]
        _write_json(out / "lavis" / f"qa_{split}.json", qa_rows)
    answers = sorted({qa["answer"] for r in rows if r["split"] == "train" for qa in r["qa"]})
    _write_json(out / "lavis" / "train_ans2label.json", {a: i for i, a in enumerate(answers)})
    return {"qa_annotations": str(out / "annotations_qa.jsonl"), "qa_lavis": str(out / "lavis")}


def render_scene(scene: Scene, frames: int = 16, size: int = 64) -> np.ndarray:
    """The frames of a scene: uint8 (frames, size, size, 3).

    Positions along the axis are computed for travel right/down and reversed for left/up, so
    ``render_scene(s.reversed()) == render_scene(s)[::-1]`` exactly.
    """
    half = max(2.0, scene.side * size / 2)
    lo, hi = half + 1 + scene.inset * size, size - half - 2 - scene.inset * size
    track = np.rint(np.linspace(lo, hi, frames))  # (frames,)
    if scene.direction in ("left", "up"):
        track = track[::-1]
    cross = round(half + 1 + scene.cross * (size - 2 * half - 3))
    yy, xx = np.mgrid[0:size, 0:size]
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    for t, along in enumerate(track):
        cx, cy = (along, cross) if scene.direction in ("left", "right") else (cross, along)
        video[t][_shape_mask(scene.shape, xx - cx, yy - cy, half)] = COLORS[scene.color]
    return video


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    # A random frozen ViT tells shapes apart mostly by how many pixels they fill, so the circle
    # is drawn a little smaller than its box (a bag-of-patches probe: 0.71 -> 0.80 shape accuracy).
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= (0.9 * half) ** 2
    # an upward triangle, apex at the top, base as wide as it is tall; a little larger than
    # the others because it covers half its box
    half *= 1.15
    return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)


def draw_scenes(num_videos: int, rng: np.random.Generator) -> list[Scene]:
    """Balanced scenes: each pass over all combinations is shuffled before the next begins."""
    combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    scenes = []
    while len(scenes) < num_videos:
        for k in rng.permutation(len(combos)):
            geometry = rng.uniform([0.25, 0.0, 0.0], [0.34, 1.0, 0.06])
            scenes.append(Scene(*combos[k], *(round(float(g), 4) for g in geometry)))
    return scenes[:num_videos]


def split_counts(num_videos: int, fractions: tuple[float, ...]) -> dict[str, int]:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"splits must be three fractions (train, val, test) summing to 1, got {fractions}")
    train, val = round(num_videos * fractions[0]), round(num_videos * fractions[1])
    return {"train": train, "val": val, "test": num_videos - train - val}


def make_synthetic_world(
    out_dir: str | Path,
    num_videos: int = 120,
    seed: int = 0,
    frames: int = 16,
    size: int = 64,
    fps: int = 8,
    ext: str = ".mp4",
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    unlabelled: float = 0.0,
) -> dict:
    """Write the synthetic world under `out_dir` (see the module docstring); return its summary.

    `unlabelled`: this fraction of the training videos (the last ones) becomes the split
    ``unlabelled``, without captions (their ``facts`` stay, for scoring pseudo-labels), also
    listed in ``pool.jsonl`` (``{"video_id", "video"}``, paths relative to `out_dir`), the manifest
    a pseudo-labelling run captions. The videos and every other caption are those of the same
    world without it.
    """
    if num_videos <= 0 or frames < 2 or size < 16:
        raise ValueError(f"need num_videos > 0, frames >= 2, size >= 16; got {num_videos}, {frames}, {size}")
    if not 0.0 <= unlabelled < 1.0:
        raise ValueError(f"unlabelled must be a fraction in [0, 1), got {unlabelled}")
    out = Path(out_dir)
    counts = split_counts(num_videos, tuple(splits))
    rng = np.random.default_rng(seed)
    scenes = draw_scenes(num_videos, rng)
    split_of = [name for name in SPLITS for _ in range(counts[name])]
    if unlabelled:
        pool = round(counts["train"] * unlabelled)
        counts = {
            "train": counts["train"] - pool,
            "unlabelled": pool,
            "val": counts["val"],
            "test": counts["test"],
        }
        split_of = [name for name in counts for _ in range(counts[name])]
    rows = []
    for i, (scene, split) in enumerate(zip(scenes, split_of, strict=True)):
        video_id = f"synth{i:04d}"
        row = {
            "video_id": video_id,
            "video": video_id + ext,
            "split": split,
            "captions": scene_captions(scene, rng),
        }
        if split == "unlabelled":
            row["captions"] = []
        rows.append({**row, "facts": scene.facts(), "scene": asdict(scene)})
    for row, scene in zip(rows, scenes, strict=True):
        write_video(out / "videos" / row["video"], render_scene(scene, frames, size), fps=fps)
    _write_json(out / "annotations.jsonl", rows, lines=True)
    _write_lavis(out / "lavis", rows)
    if unlabelled:
        pool_rows = [
            {"video_id": r["video_id"], "video": f"videos/{r['video']}"} for r in rows if not r["captions"]
        ]
        _write_json(out / "pool.jsonl", pool_rows, lines=True)
    qa_files = write_world_qa(out)
    summary = {
        "out_dir": str(out),
        "videos": str(out / "videos"),
        "annotations": str(out / "annotations.jsonl"),
        "lavis": str(out / "lavis"),
        **({"pool": str(out / "pool.jsonl"), "unlabelled": unlabelled} if unlabelled else {}),
        "num_videos": num_videos,
        "counts": counts,
        "seed": seed,
        "frames": frames,
        "size": size,
        "fps": fps,
        "ext": ext,
        "vocabulary": list(SYNTH_VOCAB),
        "order_words": order_words(),
        **qa_files,
    }
    _write_json(out / "summary.json", summary)
    return summary


def read_facts(annotations: str | Path) -> dict[str, dict[str, str]]:
    """``{video_id: facts}`` from a synthetic world's ``annotations.jsonl``."""
    with Path(annotations).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["video_id"]: row["facts"] for row in rows}


def _write_lavis(folder: Path, rows: list[dict]) -> None:
    """LAVIS form: training rows per caption; val/test rows per video plus COCO-style ground truth."""
    for split in SPLITS:
        videos = [r for r in rows if r["split"] == split]
        if split == "train":
            train = [
                {"video": r["video"], "caption": c, "image_id": r["video_id"]}
                for r in videos
                for c in r["captions"]
            ]
            _write_json(folder / "cap_train.json", train)
            continue
        _write_json(
            folder / f"cap_{split}.json", [{"video": r["video"], "image_id": r["video_id"]} for r in videos]
        )
        annotations = [{"image_id": r["video_id"], "caption": c} for r in videos for c in r["captions"]]
        gt = {
            "annotations": [{**a, "id": k} for k, a in enumerate(annotations)],
            "images": [{"id": r["video_id"]} for r in videos],
        }
        _write_json(folder / f"cap_{split}_gt.json", gt)


def _write_json(path: Path, data: object, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(row) + "\n" for row in data)  # type: ignore[union-attr]
        else:
            json.dump(data, f, indent=1)
    os.replace(tmp, path)
