"""Stage `extract` end to end on a tiny random BLIP-2 and real encoded synthetic videos.

The world: 8 good H.264 clips plus five broken entries (corrupt bytes, empty file, truncated
mp4, a text file, a missing file). One in-process run is shared by most tests; the Dask and
kill-and-resume tests compare their stores with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cache.store import FeatureStore, FingerprintMismatch
from pipeline.config import config_from_dict
from pipeline.runtime.stage import StageError

NUM_GOOD = 8
BROKEN = {  # video id -> what its failure reason must say
    "corrupt": "not a readable video",
    "empty": "empty file",
    "truncated": "not a readable video",
    "notvideo": "not a readable video",
    "missing": "no such file",
}


def _make_world(root: Path) -> Path:
    """8 synthetic videos + broken files; returns the annotations file listing them all."""
    from pipeline.demo.synth import make_synthetic_world

    world = make_synthetic_world(root / "world", num_videos=NUM_GOOD, seed=0)
    videos = Path(world["videos"])
    good = sorted(videos.glob("*.mp4"))
    rng = np.random.default_rng(0)
    (videos / "corrupt.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (videos / "empty.mp4").write_bytes(b"")
    data = good[0].read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (videos / "notvideo.mp4").write_text("this is a text file, not a video\n" * 50)
    rows = [json.loads(line) for line in Path(world["annotations"]).read_text().splitlines()]
    rows += [{"video_id": v, "video": f"{v}.mp4", "split": "test", "captions": ["a thing"]} for v in BROKEN]
    annotations = root / "annotations.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return annotations


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.demo.testmodels import init_model

    root = tmp_path_factory.mktemp("extract")
    annotations = _make_world(root)
    model = init_model(root / "tiny", "tiny-t5", vocab_from=annotations, seed=0)
    return {"root": root, "annotations": annotations, "model": model}


def _config(world, name, **sections):
    raw = {
        "run": {"output_dir": str(world["root"] / name), "seed": 3},
        "data": {"annotations": str(world["annotations"]), "video_root": str(world["root"] / "world/videos")},
        "model": {"pretrained": str(world["model"]), "num_frames": 4, "image_size": 32},
        "cache": {"train_views": 1},
        "extract": {"batch_size": 3, "decode_workers": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def reference(world):
    """One uninterrupted in-process run: (config, summary)."""
    from stages.extract import run

    config = _config(world, "inprocess")
    return config, run(config)


def _store(config) -> FeatureStore:
    return FeatureStore.open(config.cache_path)


def _all_tokens(store: FeatureStore) -> dict[str, np.ndarray]:
    ids = sorted(store.done_ids())
    return {v: np.stack([store.read([v], views=view)[0] for view in range(store.shape[1])]) for v in ids}


def test_in_process_run_stores_good_videos_and_reports_broken_ones(reference):
    config, summary = reference
    good = {f"synth{i:04d}" for i in range(NUM_GOOD)}
    assert summary["done"] == NUM_GOOD and summary["skipped"] == 0
    assert summary["failed"] == len(BROKEN) and set(summary["failures"]) == set(BROKEN)
    store = _store(config)
    assert store.done_ids() == good
    failed = store.failed()
    assert set(failed) == set(BROKEN)
    for video_id, why in BROKEN.items():
        assert why in failed[video_id] and f"{video_id}.mp4" in failed[video_id], failed[video_id]
    assert store.shape == (NUM_GOOD + len(BROKEN), 2, 4, 17, 32)  # (N, V, T, L, D) of the tiny ViT
    assert summary["videos_per_s"] > 0 and summary["vit_s"] > 0 and summary["decode_s"] > 0


def test_cached_tokens_equal_encode_frames_of_the_same_frames(reference, world):
    from pipeline.model import VideoCaptioner
    from pipeline.sampling import normalize_frames
    from pipeline.video import load_clip

    config, _ = reference
    store = _store(config)
    model = VideoCaptioner.from_pretrained(str(world["model"]), config.model, load_vision=True, device="cpu")
    path = world["root"] / "world/videos/synth0003.mp4"
    for view in (0, 1):
        frames = load_clip(
            path, 4, 32, view=view, seed=3, video_id="synth0003", backend=config.decode.backend
        )
        expected = model.encode_frames(normalize_frames(frames)[None])[0].numpy()  # (T, L, D)
        cached = store.read(["synth0003"], views=view)[0].astype(np.float32)
        np.testing.assert_allclose(cached, expected, rtol=2e-3, atol=2e-3)
    # the augmented view really is another sampling of the video
    assert not np.allclose(store.read(["synth0003"], views=0), store.read(["synth0003"], views=1))


@pytest.mark.parametrize(
    "processes", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["threads", "processes"]
)
def test_two_dask_workers_write_the_same_store(reference, world, processes, monkeypatch):
    import pipeline.runtime.cluster
    from stages.extract import run

    monkeypatch.setattr(pipeline.runtime.cluster, "LOCAL_WORKER_PROCESSES", processes)
    config, _ = reference
    dask_config = _config(world, f"dask-{processes}", extract={"workers": 2, "batch_size": 2})
    summary = run(dask_config)
    assert summary["mode"].startswith("dask: 2 workers") and summary["done"] == NUM_GOOD
    ours, theirs = _store(config), _store(dask_config)
    assert ours.video_ids == theirs.video_ids
    assert ours.done_ids() == theirs.done_ids() and ours.failed().keys() == theirs.failed().keys()
    assert ours.fingerprint == theirs.fingerprint
    a, b = _all_tokens(ours), _all_tokens(theirs)
    for video_id in a:
        np.testing.assert_allclose(a[video_id], b[video_id], rtol=1e-3, atol=1e-3)


_KILLABLE = """
import sys, time
import stages.extract
from pipeline.config import config_from_dict

real = stages.extract.load_views
def slow_load_views(*args, **kwargs):  # slow enough to be killed half way
    time.sleep(0.4)
    return real(*args, **kwargs)
stages.extract.load_views = slow_load_views
stages.extract.run(config_from_dict({config!r}))
"""


def test_sigkill_then_rerun_finishes_only_the_rest(reference, world):
    from stages.extract import run

    config, _ = reference
    killed = _config(world, "killed", extract={"batch_size": 1, "decode_workers": 1})
    script = textwrap.dedent(_KILLABLE).format(config=killed.to_dict())
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL, start_new_session=True)
    done_dir = killed.cache_path / "status" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len([n for n in os.listdir(done_dir) if n.isdigit()]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished (or crashed) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _store(killed).done_ids()
    assert 2 <= len(before) < NUM_GOOD
    assert not (killed.stage_dir("extract") / "DONE.json").exists()

    summary = run(killed)
    assert summary["skipped"] == len(before)
    assert summary["done"] == NUM_GOOD - len(before)  # only the videos not done before the kill
    store = _store(killed)
    assert store.done_ids() == _store(config).done_ids() and set(store.failed()) == set(BROKEN)
    a, b = _all_tokens(_store(config)), _all_tokens(store)
    for video_id in a:
        np.testing.assert_allclose(a[video_id], b[video_id], rtol=1e-3, atol=1e-3)
    assert run(killed)["done"] == NUM_GOOD - len(before)  # finished: DONE.json, skipped as a whole


def test_changed_settings_are_refused_naming_the_difference(reference, world):
    from pipeline.demo.testmodels import init_model
    from stages.extract import run

    config, _ = reference
    with pytest.raises(StageError, match="model.num_frames: 4 -> 8"):  # the stage is DONE with 4 frames
        run(_config(world, "inprocess", model={"num_frames": 8}))
    shared = {"path": str(config.cache_path), "train_views": 1}  # another run dir, the same store
    with pytest.raises(FingerprintMismatch, match="num_frames: cache 4, config 8"):
        run(_config(world, "other-frames", model={"num_frames": 8}, cache=shared))
    other = init_model(world["root"] / "tiny-other", "tiny-t5", vocab_from=world["annotations"], seed=1)
    with pytest.raises(FingerprintMismatch, match="vit_weights_sha256"):
        run(_config(world, "other-weights", model={"pretrained": str(other)}, cache=shared))
    assert _store(config).done_ids()  # the refused runs left the store alone


def test_force_starts_a_new_store(reference, world):
    from stages.extract import run

    config = _config(world, "forced", extract={"splits": ["val"]})
    run(config)
    summary = run(_config(world, "forced", extract={"splits": ["val"]}, model={"num_frames": 2}), force=True)
    assert summary["done"] == 2 and summary["skipped"] == 0  # recomputed everything, with the new settings
    assert _store(config).shape[2] == 2


def test_cache_info_json_tells_the_truth(reference):
    from click.testing import CliRunner

    from pipeline.app.cli import main

    config, _ = reference
    result = CliRunner().invoke(main, ["cache", "info", str(config.cache_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["videos"] == NUM_GOOD + len(BROKEN) and info["done"] == NUM_GOOD
    assert set(info["failed"]) == set(BROKEN) and all(info["failed"].values())
    assert info["fingerprint"]["num_frames"] == 4 and info["fingerprint"]["views"] == 2
    assert info["fingerprint"] == _store(config).fingerprint
    on_disk = sum(p.stat().st_size for p in Path(config.cache_path).rglob("*") if p.is_file())
    assert info["bytes"] == on_disk > 0


def test_weights_hash_follows_the_weights_not_the_name():
    import copy

    import torch

    from stages.extract import hash_weights

    module = torch.nn.Linear(4, 3)
    twin = copy.deepcopy(module)
    assert hash_weights(module) == hash_weights(twin)
    with torch.no_grad():
        twin.weight[0, 0] += 1e-3
    assert hash_weights(module) != hash_weights(twin)


def test_one_model_of_a_kind_is_cached_per_process_and_can_be_released():
    from pipeline.runtime.cluster import _CACHE, release_cached, worker_cached

    loads = []
    first = worker_cached(("probe-kind", 1), lambda: loads.append(1) or "model 1")
    assert worker_cached(("probe-kind", 1), lambda: loads.append(2) or "again") == first and loads == [1]
    assert worker_cached(("probe-kind", 2), lambda: loads.append(3) or "model 2") == "model 2"
    assert ("probe-kind", 1) not in _CACHE and ("probe-kind", 2) in _CACHE  # the older one dropped
    release_cached("probe-kind")
    assert not any(key[0] == "probe-kind" for key in _CACHE)
