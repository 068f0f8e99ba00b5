"""Stage bookkeeping: DONE.json, skipping, refusing changed settings, forcing, atomic writes."""

import json

import pytest

from pipeline.config import config_from_dict
from pipeline.runtime.files import atomic_write_json
from pipeline.runtime.stage import Stage, StageError, read_done


def _config(tmp_path, **train):
    return config_from_dict({"run": {"output_dir": str(tmp_path / "run")}, "train": train})


def test_finish_then_skip(tmp_path):
    config = _config(tmp_path)
    stage = Stage(config, "train")
    assert not stage.done
    stage.finish({"best_cider": 0.5})
    done = read_done(config, "train")
    assert done["fingerprint"] == stage.fingerprint and done["summary"]["best_cider"] == 0.5
    again = Stage(config, "train")
    assert again.done and again.summary["best_cider"] == 0.5
    assert (tmp_path / "run/train/log.txt").read_text().count("skipping") == 1


def test_changed_settings_are_refused_with_the_difference(tmp_path):
    Stage(_config(tmp_path), "train").finish({})
    with pytest.raises(StageError) as err:
        Stage(_config(tmp_path, lr=1e-4), "train")
    assert "train.lr: 5e-05 -> 0.0001" in str(err.value) and "--force" in str(err.value)


def test_force_redoes_and_can_start_fresh(tmp_path):
    Stage(_config(tmp_path), "extract").finish({})
    (tmp_path / "run/extract/partial.bin").write_bytes(b"x")
    stage = Stage(_config(tmp_path), "extract", force=True)
    assert not stage.done
    assert not (tmp_path / "run/extract/partial.bin").exists()
    assert read_done(_config(tmp_path), "extract") is None


def test_unfinished_stage_has_no_done_file(tmp_path):
    stage = Stage(_config(tmp_path), "eval")
    assert not (stage.dir / "DONE.json").exists()
    assert json.loads((stage.dir / "config.json").read_text())["run"]["output_dir"].endswith("run")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_input_changes_say_why_a_stage_is_stale():
    from pipeline.runtime.stage import input_changes

    old = {"annotations": "a1", "model": "m", "extract": None, "train": "run1", "scst": "run2"}
    new = {"annotations": "a2", "model": "m", "extract": "run3", "train": "run4", "scst": None}
    assert input_changes(old, new) == [
        "annotations changed (their content is not what this stage read)",
        "extract finished since this stage ran",
        "scst is no longer finished (its DONE.json is gone)",
        "train was redone",
    ]
    assert input_changes(None, new) == ["inputs: not recorded (finished by an older vidcap)"]


def test_the_stage_lock_is_reentrant_within_a_process_and_released_by_the_entry(tmp_path):
    from pipeline.runtime import locks
    from pipeline.runtime.stage import stage_entry

    config = _config(tmp_path)

    @stage_entry("train")
    def run(config, force=False):
        Stage(config, "train")
        Stage(config, "train")  # the same process re-opens its own stage: no refusal
        return {"held": locks.lock_path(config.stage_dir("train")) in locks._held}

    assert run(config) == {"held": True}
    assert locks.lock_path(config.stage_dir("train")) not in locks._held


def test_a_forced_stage_that_raises_gets_its_old_folder_back(tmp_path):
    from pipeline.runtime.stage import stage_entry

    config = _config(tmp_path)
    Stage(config, "eval").finish({"cider": 1.0})

    @stage_entry("eval")
    def run(config, force=False):
        stage = Stage(config, "eval", force=force)
        (stage.dir / "half.json").write_text("{}")
        raise StageError("a value found wrong while setting up")

    with pytest.raises(StageError):
        run(config, force=True)
    assert read_done(config, "eval")["summary"]["cider"] == 1.0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".eval.lock", "eval"]
    assert not (tmp_path / "run/eval/half.json").exists()
