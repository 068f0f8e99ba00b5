"""Fault injection: what a hostile user or a bad day does to a run, and what vidcap must do about it.

Each test is one way of losing data or reporting a stale or silently wrong result (issue 13,
items 1-3): a forced run on a foreign folder, a forced run with a bad value, an output that is
an input, two concurrent writers, a killed lock holder, edited annotations, a redone upstream
stage, a cache without validation videos or half extracted, a deleted or truncated chunk, a
cache from another ViT, a model of other frames than its cache. Each asserts: nothing lost,
nothing stale, one clear message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cache.store import FeatureStore, FingerprintMismatch, StoreError
from pipeline.demo.tinyworld import tiny_config
from pipeline.errors import ConfigError, StageError, UserError
from pipeline.runtime.locks import OutputLocked, acquire, release
from pipeline.runtime.stage import Stage, read_done

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _copy_world(tiny_world, root: Path) -> dict[str, str]:
    """The tiny world with its own copy of the annotations (tests edit them)."""
    annotations = root / "annotations.jsonl"
    shutil.copy(tiny_world["annotations"], annotations)
    return {**tiny_world, "annotations": str(annotations)}


def _store_of(tiny_world, path: Path, keep, fingerprint=None, listed=None) -> FeatureStore:
    """A copy of the tiny world's store with the videos `listed(video_id, split)` selects (default:
    all), of which only those `keep(video_id, split)` selects are extracted."""
    source = FeatureStore.open(tiny_world["cache"])
    splits = {
        r["video_id"]: r["split"]
        for r in map(json.loads, Path(tiny_world["annotations"]).read_text().splitlines())
    }
    _, views, frames, tokens, width = source.shape
    ids = [v for v in source.video_ids if listed is None or listed(v, splits[v])]
    store = FeatureStore.create(
        path, ids, views, frames, tokens, width, fingerprint=fingerprint or source.fingerprint
    )
    for video_id in ids:
        i = source.index_of(video_id)
        if keep(video_id, splits[video_id]):
            store.write_video(video_id, np.stack([source.read(i, views=v)[0] for v in range(views)]))
    return store


# ---------------------------------------------------------------------------------------
# 1. Never touch what is not ours
# ---------------------------------------------------------------------------------------


def test_forced_extract_refuses_a_cache_path_that_is_not_a_feature_store(tiny_world, tmp_path, one_thread):
    from stages import extract

    folder = tmp_path / "my_photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    config = tiny_config(tiny_world, tmp_path / "run", cache={"path": str(folder)})
    with pytest.raises(StageError, match="not a feature store vidcap wrote; refusing"):
        extract.run(config, force=True)
    with pytest.raises(StoreError, match="no feature store"):
        extract.run(config)
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"] and (
        folder / "holiday.jpg"
    ).read_bytes() == b"precious"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    config = tiny_config(tiny_world, tmp_path / "run2", cache={"path": str(a_file)})
    with pytest.raises(StageError, match="not a feature store vidcap wrote"):
        extract.run(config, force=True)
    assert a_file.read_text() == "mine" and not list(tmp_path.glob(".notes.txt.*replaced"))


def test_a_forced_extract_that_fails_puts_the_old_store_back(tiny_world, tmp_path, one_thread, monkeypatch):
    from stages import extract

    store = _store_of(tiny_world, tmp_path / "shared.zarr", lambda v, split: split == "test")
    done = store.done_ids()
    config = tiny_config(tiny_world, tmp_path / "run", cache={"path": str(store.path)})

    def fail(*args, **kwargs):
        raise StageError("the disk filled up while creating the new store")

    monkeypatch.setattr(extract, "open_store", fail)
    with pytest.raises(StageError, match="disk filled up"):
        extract.run(config, force=True)
    assert (
        FeatureStore.open(store.path).done_ids() == done and not (tmp_path / ".shared.zarr.replaced").exists()
    )
    monkeypatch.undo()
    only_test = tiny_config(
        tiny_world, tmp_path / "run", cache={"path": str(store.path)}, extract={"splits": ["test"]}
    )
    assert (
        extract.run(only_test, force=True)["done"] == 4
    )  # a new store; the old one deleted once it finished
    assert (
        FeatureStore.open(store.path).video_ids == sorted(done)
        and not (tmp_path / ".shared.zarr.replaced").exists()
    )


def test_force_refuses_a_stage_folder_vidcap_did_not_write(tiny_world, tmp_path):
    mine = tmp_path / "run" / "train"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(StageError, match="did not write.*refusing"):
        Stage(tiny_config(tiny_world, tmp_path / "run"), "train", force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_forced_run_that_fails_puts_the_finished_stage_back(tiny_world, tmp_path):
    """`scst --force` with a bad value must not cost the finished scst/ (best, checkpoints, DONE.json)."""
    from stages import scst

    config = tiny_config(tiny_world, tmp_path / "run")
    finished = Stage(config, "scst")
    (finished.dir / "best").mkdir()
    (finished.dir / "best" / "weights").write_bytes(b"the good model")
    finished.finish({"best_val_cider": 0.7})
    done = read_done(config, "scst")
    with pytest.raises(UserError):
        scst.run(tiny_config(tiny_world, tmp_path / "run", scst={"batch_size": 0}), force=True)
    assert read_done(config, "scst") == done
    assert (config.stage_dir("scst") / "best" / "weights").read_bytes() == b"the good model"
    assert not (tmp_path / "run" / ".scst.replaced").exists()


def test_a_forced_run_that_finishes_deletes_what_it_replaced(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path / "run")
    first = Stage(config, "eval")
    (first.dir / "old.json").write_text("{}")
    first.finish({})
    Stage(config, "eval", force=True).finish({})
    assert not (config.stage_dir("eval") / "old.json").exists()
    assert not (tmp_path / "run" / ".eval.replaced").exists()


def test_a_forced_run_killed_midway_keeps_the_old_result_aside_until_a_run_finishes(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path / "run")
    Stage(config, "eval").finish({"CIDEr": 0.9})
    release(config.stage_dir("eval"), all_levels=True)  # as `stage_entry` does when `run` returns
    killed = textwrap.dedent(f"""
        import json, os, signal
        from pipeline.config import config_from_dict
        from pipeline.runtime.stage import Stage
        stage = Stage(config_from_dict(json.loads({json.dumps(config.to_dict())!r})), "eval", force=True)
        (stage.dir / "half.json").write_text("{{}}")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", killed], env=ENV)
    assert result.returncode == -signal.SIGKILL
    aside = tmp_path / "run" / ".eval.replaced"
    assert json.loads((aside / "DONE.json").read_text())["summary"]["CIDEr"] == 0.9  # not lost
    resumed = Stage(config, "eval")  # the killed forced run's folder, resumed
    assert not resumed.done and (resumed.dir / "half.json").exists()
    resumed.finish({"CIDEr": 0.8})
    assert not aside.exists() and read_done(config, "eval")["summary"]["CIDEr"] == 0.8


def test_caption_out_equal_to_an_input_manifest_is_refused(tiny_world, tmp_path):
    from stages.caption import caption_videos

    manifest = tmp_path / "videos.txt"
    videos = sorted(Path(tiny_world["videos"]).glob("*.mp4"))[:2]
    manifest.write_text("".join(f"{v}\n" for v in videos))
    before = manifest.read_bytes()
    config = tiny_config(tiny_world, tmp_path / "run")
    with pytest.raises(ConfigError, match="--out .* is input"):
        caption_videos([str(manifest)], tiny_world["model"], str(manifest), config)
    assert manifest.read_bytes() == before


def test_a_cache_path_that_is_or_holds_an_input_is_refused(tiny_world, tmp_path):
    for path in (tiny_world["videos"], str(Path(tiny_world["videos"]).parent)):
        with pytest.raises(ConfigError, match=r"cache.path .* (is|holds) data\.(video_root|annotations)"):
            Stage(tiny_config(tiny_world, tmp_path / "run", cache={"path": path}), "extract")


# ---------------------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------------------


def _hold_lock(output: Path) -> subprocess.Popen:
    """Another process holding the lock of `output` until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.runtime.locks import acquire
        acquire({str(output)!r}, "test output")
        print("locked", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    output = tmp_path / "features.zarr"
    holder = _hold_lock(output)
    try:
        with pytest.raises(OutputLocked, match=f"pid {holder.pid} "):
            acquire(output, "feature store")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    acquire(output, "feature store")  # the kernel released the dead holder's lock: no stale lock
    release(output)


def test_two_runs_of_one_stage_in_one_output_dir_are_refused(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path / "run")
    holder = _hold_lock(config.stage_dir("train"))
    try:
        with pytest.raises(OutputLocked, match="stage folder of 'train'.*another process"):
            Stage(config, "train")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_extracts_on_one_store_are_refused(tiny_world, tmp_path, one_thread):
    from stages import extract

    store = tmp_path / "shared.zarr"
    holder = _hold_lock(store)
    try:
        with pytest.raises(OutputLocked, match="feature store"):
            extract.run(tiny_config(tiny_world, tmp_path / "run", cache={"path": str(store)}))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---------------------------------------------------------------------------------------
# 2. Results are a function of their inputs
# ---------------------------------------------------------------------------------------


def test_edited_annotations_make_every_stage_stale_with_the_reason(tiny_world, tmp_path):
    world = _copy_world(tiny_world, tmp_path)
    config = tiny_config(world, tmp_path / "run")
    for name in ("extract", "train", "scst", "eval"):
        Stage(config, name).finish({})
    with open(world["annotations"], "a") as f:  # edited in place: a new test reference
        row = json.loads(Path(tiny_world["annotations"]).read_text().splitlines()[0])
        f.write(json.dumps({**row, "video_id": "new0", "split": "test"}) + "\n")
    for name in ("extract", "train", "scst", "eval"):
        with pytest.raises(StageError, match="annotations changed"):
            Stage(config, name)


def test_a_forced_upstream_stage_makes_the_downstream_ones_stale(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path / "run")
    for name in ("extract", "train", "scst"):
        Stage(config, name).finish({})
    Stage(config, "extract", force=True).finish({})
    with pytest.raises(StageError, match="extract was redone"):
        Stage(config, "train")
    Stage(config, "train", force=True).finish({})
    with pytest.raises(StageError, match="train was redone"):
        Stage(config, "scst")


def test_zero_validation_videos_is_an_error_unless_allowed(tiny_world, tmp_path, one_thread):
    from stages import train

    no_val = lambda v, split: split != "val"  # noqa: E731 (as `extract.splits: [train, test]` makes it)
    cache = _store_of(tiny_world, tmp_path / "train_only.zarr", no_val, listed=no_val)
    config = tiny_config(tiny_world, tmp_path / "run", cache={"path": str(cache.path)})
    with pytest.raises(StageError, match="no video of the validation split 'val'.*allow_no_validation"):
        train.run(config)
    assert read_done(config, "train") is None


def test_a_half_extracted_cache_is_an_error_and_finishing_it_makes_train_stale(
    tiny_world, tmp_path, one_thread
):
    from pipeline.training import _cache_state
    from stages import train

    half = _store_of(tiny_world, tmp_path / "half.zarr", lambda v, split: split != "train" or v < "synth0006")
    config = tiny_config(tiny_world, tmp_path / "run", cache={"path": str(half.path)})
    with pytest.raises(StageError, match="not extracted yet.*allow_partial_cache"):
        train.run(config)
    opted_in = tiny_config(
        tiny_world, tmp_path / "run", cache={"path": str(half.path)}, train={"allow_partial_cache": True}
    )
    Stage(opted_in, "train", extra_inputs=_cache_state(opted_in, "train")).finish({})  # as train.run would
    full = FeatureStore.open(tiny_world["cache"])
    for video_id in sorted(full.done_ids() - half.done_ids()):
        i = full.index_of(video_id)
        half.write_video(video_id, np.stack([full.read(i, views=v)[0] for v in range(full.shape[1])]))
    with pytest.raises(StageError, match="feature cache changed"):
        Stage(opted_in, "train", extra_inputs=_cache_state(opted_in, "train"))


# ---------------------------------------------------------------------------------------
# 3. The cache proves what it serves
# ---------------------------------------------------------------------------------------


def test_a_deleted_or_truncated_chunk_is_an_error_naming_the_video_and_verify_finds_it(tiny_world, tmp_path):
    from click.testing import CliRunner

    from pipeline.app.cli import main

    store = _store_of(tiny_world, tmp_path / "f.zarr", lambda v, split: split == "test")
    deleted, truncated = sorted(store.done_ids())[:2]
    store._chunk_file(store.index_of(deleted), 0).unlink()
    chunk = store._chunk_file(store.index_of(truncated), 0)
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match=f"video '{deleted}'.*missing"):
        store.read([deleted])
    with pytest.raises(StoreError, match=f"video '{truncated}'.*100 bytes"):
        store.read([truncated])
    result = CliRunner().invoke(main, ["cache", "info", "--verify", str(store.path)])
    assert result.exit_code == 1 and "2 damaged" in result.output
    assert deleted in result.output and truncated in result.output
    result = CliRunner().invoke(main, ["cache", "info", "--verify", "--repair", str(store.path)])
    assert {deleted, truncated} <= set(store.pending_ids())  # extract will redo them
    assert CliRunner().invoke(main, ["cache", "info", "--verify", str(store.path)]).exit_code == 0


def test_train_refuses_a_cache_of_another_vit(tiny_world, tmp_path, one_thread):
    from stages import train

    real = FeatureStore.open(tiny_world["cache"]).fingerprint
    other = _store_of(
        tiny_world, tmp_path / "other.zarr", lambda v, split: True, {**real, "vit_weights_sha256": "0" * 64}
    )
    config = tiny_config(tiny_world, tmp_path / "run", cache={"path": str(other.path)})
    with pytest.raises(FingerprintMismatch, match="vit_weights_sha256: cache '0000"):
        train.run(config)
    assert read_done(config, "train") is None


def test_eval_refuses_a_model_of_other_frames_than_the_cache(tiny_world, tmp_path, one_thread):
    """A 2-frame model on the 4-frame cache: an error with `cache`, raw videos with `auto`."""
    from pipeline.config import ModelConfig
    from pipeline.model import VideoCaptioner
    from stages import eval as eval_stage

    two_frames = ModelConfig(pretrained=tiny_world["model"], num_frames=2, image_size=32)
    export = VideoCaptioner.from_pretrained(tiny_world["model"], two_frames, load_vision=False).save_trained(
        tmp_path / "two_frames"
    )
    config = tiny_config(tiny_world, tmp_path / "run", eval={"models": [str(export)], "source": "cache"})
    spec = eval_stage.ModelSpec("two_frames", export)
    with pytest.raises(StageError, match="(?s)num_frames: cache 4, config 2.*eval.source=video"):
        eval_stage.source_for_model(config, spec, "cache", None)
    auto = tiny_config(tiny_world, tmp_path / "run", eval={"source": "auto"})

    class Log:
        lines: list[str] = []

        def info(self, *args):
            self.lines.append(args[0] % args[1:])

    assert eval_stage.source_for_model(auto, spec, "cache", Log()) == "video"
    assert "num_frames" in Log.lines[0]
    zero_shot = eval_stage.ModelSpec("zero_shot", None)
    assert (
        eval_stage.source_for_model(auto, zero_shot, "cache", Log()) == "cache"
    )  # the model it was made with


def test_a_reader_hashes_the_vit_from_the_files_as_extract_hashes_the_loaded_one(tiny_world):
    import torch

    from pipeline.config import ModelConfig
    from pipeline.features import hash_weights, vit_weights_sha256
    from pipeline.vision import FrameEncoder

    encoder = FrameEncoder.from_pretrained(
        tiny_world["model"], ModelConfig(num_frames=4, image_size=32), "cpu"
    )
    assert vit_weights_sha256(tiny_world["model"], "float32") == hash_weights(encoder.vision_model)
    encoder.vision_model.to(torch.bfloat16)  # what extract hashes under bf16 autocast on CUDA
    assert vit_weights_sha256(tiny_world["model"], "bfloat16") == hash_weights(encoder.vision_model)
