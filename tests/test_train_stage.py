"""Stage `train` end to end on CPU: outputs, skip, kill-and-resume, export, torchrun (slow), learning (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.demo.tinyworld import build_tiny_world, tiny_config
from pipeline.runtime.stage import StageError

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One 2-epoch run (3 steps per epoch), shared by the output, skip and export tests."""
    import stages.train as train

    config = tiny_config(world, tmp_path_factory.mktemp("run"))
    return config, train.run(config)


def test_train_writes_checkpoints_logs_curves_best_and_done(trained):
    config, summary = trained
    out = config.stage_dir("train")
    assert summary["steps"] == 6 and summary["epochs"] == 2 and summary["steps_per_epoch"] == 3
    assert summary["best_path"] == str(out / "best") and summary["seconds"] > 0
    assert summary["best_val_cider"] >= 0 and summary["best_epoch"] in (1, 2)
    for name in (
        "DONE.json",
        "metrics.jsonl",
        "curves.png",
        "log.txt",
        "best/video_model.json",
        "best/val_score.json",
        "val/epoch_000.json",
        "val/epoch_002.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    state = torch.load(out / "checkpoints/step_00000006/state.pt", weights_only=True)
    assert state["state"]["global_step"] == 6 and len(state["rng"]) == 1
    assert set(state["optimizer"]) == {"state", "param_groups"} and state["scheduler"]["last_epoch"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(r["loss"] > 0 for r in steps)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    best = json.loads((out / "best/val_score.json").read_text())
    assert best["val_cider"] == summary["best_val_cider"] and best["epoch"] == summary["best_epoch"]


def test_second_run_skips_and_changed_settings_are_refused(trained):
    import stages.train as train

    config, summary = trained
    started = time.time()
    assert train.run(config) == summary
    assert time.time() - started < 5
    assert "already done" in (config.stage_dir("train") / "log.txt").read_text()
    config.train.lr = 5e-4
    try:
        with pytest.raises(StageError, match="train.lr"):
            train.run(config)
    finally:
        config.train.lr = 1e-3


def test_best_model_loads_and_export_copies_it(trained, tmp_path):
    from pipeline.model import VideoCaptioner
    from stages.train import export_run

    config, summary = trained
    out = export_run(config.output_dir, tmp_path / "export")
    exported = json.loads((out / "export.json").read_text())
    assert exported["stage"] == "train" and exported["val_cider"] == summary["best_val_cider"]
    model = VideoCaptioner.from_trained(out, load_vision=False)
    assert model.cfg.num_frames == 4 and model.cfg.image_size == 32
    with pytest.raises(StageError, match="not empty"):
        export_run(config.output_dir, out)


def test_training_from_video_matches_training_from_the_cache(trained, world, tmp_path):
    """`train.source: video` (decode + ViT per step, in a DataLoader worker) sees the same frames:
    its first losses equal the cache run's up to float16 rounding of the cached tokens."""
    import stages.train as train

    cache_config, _ = trained
    config = tiny_config(world, tmp_path / "video", train={"source": "video", "epochs": 1, "num_workers": 1})
    summary = train.run(config)
    assert summary["steps"] == 3

    def losses(c):
        lines = (c.stage_dir("train") / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"][:3]

    # identical plan and warmup (steps 1-3 are in warmup or use its updates), only the schedule tail differs
    assert losses(config) == pytest.approx(losses(cache_config), rel=2e-3)


def _train_in_subprocess(config_path: Path) -> subprocess.Popen:
    code = "import sys; from pipeline.config import load_config; import stages.train as t; t.run(load_config(sys.argv[1]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(config_path)],
        cwd=REPO,
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _write_config(config, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def test_kill_and_resume_reproduces_the_uninterrupted_run(trained, world, tmp_path):
    """SIGKILL after the first checkpoint, re-run: same final weights and losses, bit for bit (CPU)."""
    import stages.train as train

    reference, _ = trained
    resumed = tiny_config(world, tmp_path / "resumed")
    out = resumed.stage_dir("train")
    proc = _train_in_subprocess(_write_config(resumed, tmp_path / "resumed.yaml"))
    deadline = time.time() + 120
    while not (out / "checkpoints/step_00000002").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE.json").exists(), "the run finished before it could be killed"
    train.run(resumed)
    log = (out / "log.txt").read_text()
    assert "resuming from" in log

    ref_out = reference.stage_dir("train")
    for folder in ("checkpoints/step_00000006", "best"):
        name = "trainable.safetensors" if folder.startswith("checkpoints") else "trained.safetensors"
        a, b = load_file(str(ref_out / folder / name)), load_file(str(out / folder / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    strip = ("steps_per_s", "val_seconds")

    def curve(path):
        return [
            {k: v for k, v in json.loads(line).items() if k not in strip}
            for line in path.read_text().splitlines()
        ]

    assert curve(out / "metrics.jsonl") == curve(ref_out / "metrics.jsonl")


def test_changed_settings_do_not_resume_a_checkpoint(world, tmp_path):
    import stages.train as train

    config = tiny_config(world, tmp_path / "run", train={"epochs": 1})
    train.run(config)
    (config.stage_dir("train") / "DONE.json").unlink()  # as if killed after its last checkpoint
    changed = tiny_config(world, tmp_path / "run", train={"epochs": 1, "lr": 5e-4})
    with pytest.raises(StageError, match=r"(?s)train.lr: 0.001 -> 0.0005.*--force"):
        train.run(changed)
    again = train.run(config)  # same settings: resumes from the final checkpoint and only finishes
    assert again["steps"] == 3 and (config.stage_dir("train") / "DONE.json").exists()
    assert "resuming from" in (config.stage_dir("train") / "log.txt").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(world, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo): train with gradient accumulation, then SCST; rank 0 writes."""
    config = tiny_config(
        world,
        tmp_path / "ddp",
        train={"epochs": 1, "checkpoint_every": 100, "grad_accum": 2},
        scst={"batch_size": 4, "max_steps": 2, "samples": 3, "max_new_tokens": 8},
    )
    path = _write_config(config, tmp_path / "ddp.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "run_pipeline.py", "--config", str(path), "--stages", "train,scst"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = config.stage_dir("train")
    assert json.loads((out / "DONE.json").read_text())["summary"]["steps"] == 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    meta = json.loads((out / "checkpoints/step_00000003/meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(torch.load(out / "checkpoints/step_00000003/state.pt", weights_only=True)["rng"]) == 2
    assert (out / "best/trained.safetensors").is_file()
    scst = json.loads((config.stage_dir("scst") / "DONE.json").read_text())["summary"]
    assert scst["steps"] == 2 and (config.stage_dir("scst") / "best/video_model.json").is_file()


@pytest.mark.slow
def test_ce_training_beats_the_untrained_model(tmp_path_factory):
    """On a 120-video synthetic world, val CIDEr-D after CE is far above the random model's.

    The LLM trains too (`llm: full`): a frozen *random* tiny LM is too weak a decoder to learn
    templated captions through 8 prefix queries in a test's time (best val CIDEr-D 0.23 after
    15 epochs), while `full` reaches about 1.8 in 6 epochs (about 40 s on one CPU thread).
    """
    import stages.train as train

    world = build_tiny_world(tmp_path_factory.getbasetemp() / "train_world_120", num_videos=120)
    config = tiny_config(
        world,
        tmp_path_factory.mktemp("learn"),
        model={"llm": "full"},
        train={"epochs": 6, "batch_size": 8, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "captions": "all",
               "checkpoint_every": 1000, "log_every": 20, "val_max_videos": 0},
        eval={"batch_size": 24, "max_new_tokens": 16},
    )  # fmt: skip
    summary = train.run(config)
    assert (
        summary["start_val_cider"] < 0.1 and summary["best_val_cider"] > summary["start_val_cider"] + 0.5
    ), summary
