"""Linear probes of cached tokens (pipeline/demo/probe.py)."""

import numpy as np
import pytest

from cache.store import FeatureStore
from pipeline.demo.probe import format_probe_table, linear_probe, probe_cache

DIRECTIONS = ("left", "right", "up", "down")
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def test_linear_probe_separates_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    labels = [("a", "b")[i % 2] for i in range(200)]
    features = rng.normal(size=(200, 20)).astype(np.float32)
    features[:, 3] += np.array([3.0 if label == "a" else -3.0 for label in labels])
    train = np.arange(200) < 120
    assert linear_probe(features, labels, train) >= 0.95
    shuffled = list(rng.permutation(labels))
    assert linear_probe(rng.normal(size=(200, 20)), shuffled, train) <= 0.7
    with pytest.raises(ValueError, match="both training and held-out"):
        linear_probe(features, labels, np.ones(200, dtype=bool))


def _world_store(path, num_videos=80, frames=4, tokens=3, width=8):
    """Tokens where the object's position moves with its direction: order tells it, the frame mean cannot."""
    rng = np.random.default_rng(1)
    ids = [f"v{i:03d}" for i in range(num_videos)]
    facts, splits = {}, {}
    store = FeatureStore.create(path, ids, 1, frames, tokens, width, fingerprint={"test": 1})
    for i, video_id in enumerate(ids):
        direction, color = DIRECTIONS[i % 4], ("red", "blue")[(i // 4) % 2]
        facts[video_id] = {"direction": direction, "color": color, "shape": "circle"}
        splits[video_id] = "train" if i < 56 else "test"
        x = rng.normal(scale=0.1, size=(1, frames, tokens, width)).astype(np.float32)
        for t in range(frames):
            dx, dy = STEP[direction]
            x[0, t, :, 0] += dx * (t - (frames - 1) / 2)  # position along x, centred over time
            x[0, t, :, 1] += dy * (t - (frames - 1) / 2)
        x[0, :, :, 2] += 1.0 if color == "red" else -1.0  # colour: the same in every frame
        store.write_video(video_id, x)
    return facts, splits


def test_probe_cache_tells_order_facts_from_frame_facts(tmp_path):
    facts, splits = _world_store(tmp_path / "probe.zarr")
    result = probe_cache(tmp_path / "probe.zarr", facts, splits)
    assert result["ordered"]["direction"] >= 0.9 and result["ordered"]["color"] == 1.0
    assert result["frame_mean"]["direction"] <= 0.5  # the frame mean of a centred motion is the same for all
    assert result["frame_mean"]["color"] == 1.0
    table = format_probe_table({"4f-test": result})
    assert "4f-test ordered" in table and "4f-test frame_mean" in table and "colour" in table


def test_probe_cache_needs_both_splits(tmp_path):
    facts, splits = _world_store(tmp_path / "probe.zarr", num_videos=8)
    with pytest.raises(ValueError, match="train and the test split"):
        probe_cache(tmp_path / "probe.zarr", facts, dict.fromkeys(splits, "train"))


def test_vidcap_probe_prints_the_probes_and_the_qformer_accuracy(tiny_world, tmp_path):
    from click.testing import CliRunner

    from pipeline.app.cli import main
    from pipeline.demo.tinyworld import tiny_config

    config = tiny_config(tiny_world, tmp_path / "run")
    sets = [
        f"run.output_dir={tmp_path / 'run'}",
        f"data.annotations={config.data.annotations}",
        f"data.video_root={config.data.video_root}",
        f"model.pretrained={config.model.pretrained}",
        f"model.num_frames={config.model.num_frames}",
        f"model.image_size={config.model.image_size}",
        f"cache.path={config.cache.path}",
        "data.format=jsonl",
        "model.temporal_embeddings=true",
    ]
    args = ["probe", "--qformer-epochs", "1"] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "features ordered" in result.output and "features frame_mean" in result.output
    said = result.output[result.output.index("direction from the model's fusion") :].splitlines()[0]
    assert 0 <= float(said.rsplit(":", 1)[1].split()[0]) <= 100  # "...: 25.0 (val split)"


def test_vidcap_probe_without_synthetic_facts_is_a_clear_error(tmp_path):
    from click.testing import CliRunner

    from pipeline.app.cli import main

    rows = '{"video_id": "a", "video": "a.mp4", "split": "train", "captions": ["x"]}\n'
    (tmp_path / "ann.jsonl").write_text(rows)
    args = ["probe", "--set", f"data.annotations={tmp_path / 'ann.jsonl'}", "--set", "model.pretrained=x"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "no synthetic-world facts to probe" in result.output
    assert "Traceback" not in result.output
