"""The synthetic world: real decodable videos, balanced facts, captions that need frame order."""

import json
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.annotations import read_annotations
from pipeline.demo.synth import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    SYNTH_VOCAB,
    Scene,
    draw_scenes,
    make_synthetic_world,
    order_words,
    parse_facts,
    read_facts,
    render_scene,
    scene_captions,
    split_counts,
)
from pipeline.text import clean_caption


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return make_synthetic_world(out, num_videos=20, seed=3)


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def rows(world) -> list[dict]:
    return [json.loads(line) for line in Path(world["annotations"]).read_text().splitlines()]


def test_files_exist_and_decode_to_the_rendered_frames(world):
    out = Path(world["out_dir"])
    assert {p.name for p in (out / "lavis").iterdir()} == {
        "cap_train.json", "cap_val.json", "cap_test.json", "cap_val_gt.json", "cap_test_gt.json",
        "qa_train.json", "qa_val.json", "qa_test.json", "train_ans2label.json",
    }  # fmt: skip
    assert json.loads((out / "summary.json").read_text()) == world
    videos = sorted((out / "videos").iterdir())
    assert len(videos) == 20 and all(p.suffix == ".mp4" for p in videos)
    for row in rows(world)[:4]:
        frames = decode(out / "videos" / row["video"])
        assert frames.shape == (16, 64, 64, 3)
        expected = render_scene(Scene(**row["scene"]), 16, 64)
        assert np.abs(frames.astype(int) - expected).mean() < 4  # H.264 keeps the picture


def test_split_sizes(world):
    assert world["counts"] == {"train": 12, "val": 4, "test": 4}
    m = read_annotations("jsonl", world["annotations"], video_root=world["videos"])
    assert {s: len(m.split(s)) for s in m.splits()} == world["counts"]
    assert split_counts(120, (0.6, 0.2, 0.2)) == {"train": 72, "val": 24, "test": 24}
    with pytest.raises(ValueError, match="summing to 1"):
        split_counts(10, (0.5, 0.2, 0.2))


def test_deterministic_for_a_seed(world, tmp_path):
    again = make_synthetic_world(tmp_path / "a", num_videos=20, seed=3, frames=4, size=32)
    assert [r["captions"] for r in rows(again)] == [r["captions"] for r in rows(world)]
    assert [r["facts"] for r in rows(again)] == [r["facts"] for r in rows(world)]
    other = make_synthetic_world(tmp_path / "b", num_videos=20, seed=4, frames=4, size=32)
    assert [r["captions"] for r in rows(other)] != [r["captions"] for r in rows(world)]


def test_captions_use_the_vocabulary_and_state_the_facts(world):
    vocab = set(SYNTH_VOCAB)
    assert set(order_words()) <= vocab and set(COLORS) | set(SHAPES) <= vocab
    for row in rows(world):
        assert len(set(row["captions"])) == 5  # five different phrasings
        for caption in row["captions"]:
            assert set(caption.split()) <= vocab
            assert clean_caption(caption) == caption  # already in the recipe's clean form
            assert parse_facts(caption) == row["facts"]


def test_reversing_the_frames_changes_only_the_order_words():
    scene = Scene("blue", "triangle", "right", side=0.3, cross=0.2, inset=0.03)
    back = scene.reversed()
    assert back.direction == "left"
    frames, frames_back = render_scene(scene), render_scene(back)
    assert np.array_equal(frames_back, frames[::-1])
    # no single frame tells the two apart: they show the same set of pictures
    assert sorted(f.tobytes() for f in frames) == sorted(f.tobytes() for f in frames_back)
    assert not np.array_equal(frames, frames_back)
    order = set(order_words())
    for forward, backward in zip(scene_captions(scene), scene_captions(back), strict=True):
        changed = [(a, b) for a, b in zip(forward.split(), backward.split(), strict=True) if a != b]
        assert changed and all(a in order and b in order for a, b in changed)
        assert parse_facts(backward)["direction"] == "left"


def test_every_direction_moves_the_shape_that_way():
    for direction in DIRECTIONS:
        frames = render_scene(Scene("red", "square", direction), frames=8, size=64)
        mask = np.all(frames == COLORS["red"], axis=-1)  # (T, H, W)
        ys, xs = [np.array([np.nonzero(m)[axis].mean() for m in mask]) for axis in (0, 1)]
        moving, still = (xs, ys) if direction in ("left", "right") else (ys, xs)
        sign = 1 if direction in ("right", "down") else -1
        assert np.all(sign * np.diff(moving) > 0) and np.ptp(still) == 0
        assert np.ptp(moving) > 64 / 2  # the shape crosses most of the frame


def test_facts_are_balanced():
    scenes = draw_scenes(48, np.random.default_rng(0))
    assert len({(s.color, s.shape, s.direction) for s in scenes}) == 48


def test_jsonl_and_lavis_read_back_to_the_same_manifest(world):
    from_jsonl = read_annotations("jsonl", world["annotations"], video_root=world["videos"])
    from_lavis = read_annotations("lavis", world["lavis"], video_root=world["videos"])
    assert from_lavis.records == from_jsonl.records
    assert len(from_jsonl) == 20 and all(len(r.captions) == 5 for r in from_jsonl)
    assert all(Path(r.path).is_file() for r in from_jsonl)
    facts = read_facts(world["annotations"])
    assert {vid: parse_facts(refs[0]) for vid, refs in from_jsonl.references("test").items()} == {
        vid: facts[vid] for vid in from_jsonl.references("test")
    }
