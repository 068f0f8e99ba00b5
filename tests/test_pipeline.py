"""`run_pipeline.py` end to end on the demo: every stage, skipping, resuming, the summary."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from run_pipeline import format_summary, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def demo_config(tmp: Path, *overrides: str):
    """configs/demo.yaml with its data, model and run folders moved under `tmp`."""
    return load_config(
        ROOT / "configs/demo.yaml",
        [
            f"run.output_dir={tmp / 'run'}",
            f"data.annotations={tmp / 'world/annotations.jsonl'}",
            f"data.video_root={tmp / 'world/videos'}",
            f"model.pretrained={tmp / 'tiny-t5'}",
            *overrides,
        ],
    )


SHORT = (
    "run.demo_videos=120",
    "train.epochs=2",
    "scst.epochs=1",
    "eval.num_beams=1",
    "eval.metrics=Bleu,ROUGE_L,CIDEr",
)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = demo_config(tmp, *SHORT)
    return tmp, config, run_pipeline(config)


def test_every_stage_runs_and_the_summary_has_every_model(short_run):
    tmp, config, result = short_run
    assert [s for s in result["stages"]] == ["extract", "train", "scst", "eval"]
    assert all(info["status"] == "ran" for info in result["stages"].values())
    summary = json.loads((tmp / "run/summary.json").read_text())
    assert list(summary["metrics"]) == ["zero_shot", "ce", "scst"]
    for scores in summary["metrics"].values():
        assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores) and scores["CIDEr"] >= 0
    # SCST keeps the CE model as its best unless it beats it on validation
    assert summary["metrics"]["scst"]["CIDEr"] >= summary["metrics"]["ce"]["CIDEr"] - 0.5
    assert "zero_shot" in format_summary(summary) and "CIDEr" in format_summary(summary)
    assert (tmp / "world/summary.json").exists() and (tmp / "tiny-t5/tiny_pretraining.json").exists()


def test_second_run_skips_every_stage(short_run):
    tmp, config, first = short_run
    again = run_pipeline(config)
    assert {name: info["status"] for name, info in again["stages"].items()} == dict.fromkeys(
        first["stages"], "skipped"
    )
    assert again["metrics"] == first["metrics"]


def test_changed_settings_are_refused_unless_forced(short_run):
    from pipeline.runtime.stage import StageError

    tmp, _, _ = short_run
    changed = demo_config(tmp, *SHORT, "train.epochs=3")  # the last setting wins
    with pytest.raises(StageError, match="train.epochs: 2 -> 3"):
        run_pipeline(changed, stages=["train"])


def test_a_demo_world_of_another_size_is_refused(short_run):
    tmp, _, _ = short_run
    other = demo_config(tmp, *SHORT, "run.demo_videos=60")
    with pytest.raises(
        ConfigError, match="run.demo_videos: 60, but the synthetic world in .* has 120 videos"
    ):
        run_pipeline(other)


def test_stage_selection_is_validated(short_run):
    _, config, _ = short_run
    with pytest.raises(ConfigError, match="unknown stage 'trian'"):
        run_pipeline(config, stages=["trian"])
    with pytest.raises(ConfigError, match="--from eval: not among"):
        run_pipeline(config, stages=["extract", "train"], from_stage="eval")


@pytest.mark.slow
def test_run_killed_during_train_finishes_when_rerun(tmp_path):
    overrides = [*SHORT, "train.epochs=40", "train.checkpoint_every=5", "run.stages=extract,train"]
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(ROOT / "configs/demo.yaml")]
    for o in [
        f"run.output_dir={tmp_path / 'run'}",
        f"data.annotations={tmp_path / 'world/annotations.jsonl'}",
        f"data.video_root={tmp_path / 'world/videos'}",
        f"model.pretrained={tmp_path / 'tiny-t5'}",
        *overrides,
    ]:
        args += ["--set", o]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run/train/checkpoints"
    deadline = time.time() + 600
    while not (checkpoints.exists() and any(p.name.startswith("step_") for p in checkpoints.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint appeared"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run/train/DONE.json").exists()
    subprocess.run(args, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = json.loads((tmp_path / "run/train/DONE.json").read_text())
    assert done["summary"]["epochs"] == 40
    log = (tmp_path / "run/train/log.txt").read_text()
    assert "resum" in log.lower()


@pytest.mark.slow
def test_full_demo_scst_at_least_ce(tmp_path):
    result = run_pipeline(demo_config(tmp_path))
    metrics = result["metrics"]
    assert metrics["ce"]["CIDEr"] > metrics["zero_shot"]["CIDEr"]
    assert metrics["scst"]["CIDEr"] >= metrics["ce"]["CIDEr"]
