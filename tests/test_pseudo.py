"""Pseudo-labelling: caption confidence, `vidcap caption` output read as a filtered training set, the loop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache.store import FeatureStore
from pipeline.annotations import AnnotationError, read_annotations, read_captions_jsonl
from pipeline.confidence import beam_agreement, captions_with_confidence, word_overlap
from pipeline.config import config_from_dict
from pipeline.demo.synth import make_synthetic_world
from pipeline.demo.tinyworld import IMAGE_SIZE, NUM_FRAMES
from pipeline.model import VideoCaptioner
from pipeline.runtime.records import read_records

ROOT = Path(__file__).resolve().parent.parent


def test_word_overlap_and_beam_agreement():
    assert word_overlap("a red square", "a red square") == 1.0
    assert word_overlap("a red square", "the blue circle") == 0.0
    assert word_overlap("a red square moves", "a red circle") == pytest.approx(2 * 2 / 7)
    assert beam_agreement(["a b", "a b", "c d"]) == pytest.approx((1 + 0 + 0) / 3)
    assert beam_agreement(["only one"]) == 1.0


@pytest.fixture(scope="module")
def model_and_tokens(tiny_world):
    from pipeline.config import ModelConfig

    cfg = ModelConfig(
        pretrained=tiny_world["model"], num_frames=NUM_FRAMES, image_size=IMAGE_SIZE, llm="full"
    )
    model = VideoCaptioner.from_pretrained(tiny_world["model"], cfg).eval()
    store = FeatureStore.open(tiny_world["cache"])
    tokens = torch.from_numpy(store.read(store.video_ids[:3])).float()  # (3, T, L, D)
    return model, tokens


def test_greedy_confidence_is_the_mean_token_logprob_generate_reports(model_and_tokens):
    model, tokens = model_and_tokens
    scored = captions_with_confidence(model, tokens, num_beams=1, max_new_tokens=8, min_new_tokens=0)
    out = model.generate(tokens, num_beams=1, max_new_tokens=8, min_new_tokens=0, output_logprobs=True)
    eos = (out.token_ids == model.tokenizer.eos_token_id).long()
    lengths = ((eos.cumsum(1) - eos) == 0).sum(1)
    for record, text, total, length in zip(
        scored, out.texts, out.logprobs.tolist(), lengths.tolist(), strict=True
    ):
        assert set(record) == {"caption", "confidence", "mean_logprob"}  # no beams, no agreement
        assert record["caption"] == text
        assert record["mean_logprob"] == pytest.approx(total / length, abs=1e-4)
        assert record["confidence"] == pytest.approx(math.exp(record["mean_logprob"]), rel=1e-4)
        assert 0 < record["confidence"] <= 1


def test_beam_search_keeps_its_caption_and_adds_beam_agreement(model_and_tokens):
    model, tokens = model_and_tokens
    scored = captions_with_confidence(model, tokens, num_beams=3, max_new_tokens=8, min_new_tokens=2)
    plain = model.generate(tokens, num_beams=3, max_new_tokens=8, min_new_tokens=2).texts
    assert [r["caption"] for r in scored] == plain  # returning all beams does not change the best
    assert all(0 <= r["beam_agreement"] <= 1 and 0 < r["confidence"] <= 1 for r in scored)


def _write_captions(path: Path, rows: list[dict | str]) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def _row(i: int, confidence: float, **extra) -> dict:
    return {"video": f"/data/v{i}.mp4", "video_id": f"v{i}", "caption": f"caption {i}", "confidence": confidence,
            "beam_agreement": 1 - confidence, **extra}  # fmt: skip


def test_caption_output_reads_as_a_training_set_and_filters(tmp_path):
    path = _write_captions(
        tmp_path / "c.jsonl",
        [
            _row(0, 0.9),
            {"video": "/data/bad.mp4", "error": "not a video"},
            _row(1, 0.2),
            _row(2, 0.6),
            _row(3, 0.4),
        ],
    )
    every = read_annotations("captions_jsonl", path)
    assert [r.video_id for r in every] == ["v0", "v1", "v2", "v3"]  # the error record is no example
    assert every.records[0].captions == ("caption 0",) and every.records[0].split == "train"
    assert every.records[0].path == "/data/v0.mp4"
    kept = read_captions_jsonl(path, min_confidence=0.5)
    assert [r.video_id for r in kept] == ["v0", "v2"]
    top = read_captions_jsonl(path, top_fraction=0.5)
    assert [r.video_id for r in top] == ["v0", "v2"]  # the best half, in file order
    by_agreement = read_captions_jsonl(path, score="beam_agreement", top_fraction=0.25)
    assert [r.video_id for r in by_agreement] == ["v1"]
    both = read_captions_jsonl(path, min_confidence=0.3, top_fraction=0.34)
    assert [r.video_id for r in both] == ["v0"]


def test_caption_records_that_cannot_train_are_refused_or_skipped(tmp_path):
    torn = _write_captions(tmp_path / "t.jsonl", [_row(0, 0.5)])
    with torn.open("a") as f:
        f.write('{"video": "/data/v9.mp4", "capt')  # a kill tore the last line
    assert [r.video_id for r in read_captions_jsonl(torn)] == ["v0"]
    old = _write_captions(tmp_path / "old.jsonl", [{"video": "/data/v0.mp4", "caption": "x"}])
    assert [r.video_id for r in read_captions_jsonl(old)] == ["/data/v0.mp4"]  # no id: the path
    with pytest.raises(AnnotationError, match=r"old.jsonl: line 1: no 'confidence' to filter by"):
        read_captions_jsonl(old, top_fraction=0.5)
    windows = _write_captions(tmp_path / "w.jsonl", [_row(0, 0.5, window=0, windows=2, start=0.0, end=1.0)])
    with pytest.raises(AnnotationError, match="w.jsonl: line 1: captions of windows"):
        read_captions_jsonl(windows)
    dup = _write_captions(tmp_path / "d.jsonl", [_row(0, 0.5), _row(0, 0.6)])
    with pytest.raises(AnnotationError, match=r"d.jsonl: line 2: duplicate video 'v0' \(first on line 1\)"):
        read_captions_jsonl(dup)


def test_synthetic_world_with_an_unlabelled_pool(tmp_path):
    plain = make_synthetic_world(tmp_path / "plain", num_videos=20, seed=3)
    world = make_synthetic_world(tmp_path / "pool", num_videos=20, seed=3, unlabelled=0.5)
    assert world["counts"] == {"train": 6, "unlabelled": 6, "val": 4, "test": 4}
    manifest = read_annotations("jsonl", world["annotations"], world["videos"])
    pool = manifest.split("unlabelled")
    assert len(pool) == 6 and all(not r.captions for r in pool)
    same = read_annotations("jsonl", plain["annotations"], plain["videos"])
    assert [r.captions for r in manifest.split("train")] == [r.captions for r in same.split("train")[:6]]
    rows = [json.loads(line) for line in Path(world["pool"]).read_text().splitlines()]
    assert [r["video_id"] for r in rows] == [r.video_id for r in pool]
    assert all((Path(world["out_dir"]) / r["video"]).is_file() for r in rows)


# ---------------------------------------------------------------------------------------
# The loop as a pipeline, on a tiny world
# ---------------------------------------------------------------------------------------

LOOP_STAGES = ["extract", "train_labelled", "pseudo_caption", "extract_sets", "train", "scst", "eval"]


def _loop_config(world: dict, model: str, out: Path) -> dict:
    return {
        "run": {"output_dir": str(out), "seed": 0, "device": "cpu", "threads": 1, "stages": LOOP_STAGES},
        "data": {
            "annotations": world["annotations"],
            "video_root": world["videos"],
            "train_sets": [
                {"name": "labelled", "ratio": 1},
                {
                    "name": "pseudo",
                    "ratio": 3,
                    "format": "captions_jsonl",
                    "annotations": str(out / "pseudo_caption" / "captions.jsonl"),
                    "pool": [world["pool"]],
                    "filter": {"top_fraction": 0.5},
                },
            ],
        },  # fmt: skip
        "decode": {"backend": "pyav"},
        "model": {"pretrained": model, "num_frames": 2, "image_size": 32, "llm": "full"},
        "extract": {"splits": ["train", "val", "test"], "batch_size": 8, "decode_workers": 1},
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "warmup_steps": 1,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "num_workers": 0,
            "val_max_videos": 2,
        },  # fmt: skip
        "scst": {"max_steps": 1, "batch_size": 2, "samples": 2, "baseline": "mean", "max_new_tokens": 4},
        "eval": {
            "models": ["ce", "scst"],
            "batch_size": 4,
            "num_beams": 1,
            "max_new_tokens": 4,
            "min_new_tokens": 1,
            "metrics": ["CIDEr"],
        },  # fmt: skip
        "caption": {
            "batch_size": 4,
            "num_beams": 2,
            "max_new_tokens": 4,
            "min_new_tokens": 1,
            "decode_workers": 1,
        },
    }


@pytest.fixture(scope="module")
def loop_world(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("pseudo_loop")
    world = make_synthetic_world(root / "world", num_videos=20, seed=1, frames=8, size=32, unlabelled=0.5)
    return world, tiny_models["tiny-t5"], root


@pytest.mark.slow  # 14 s alone, 26 s beside another run on 2 cores
def test_the_loop_runs_end_to_end_then_skips_every_stage(loop_world, one_thread):
    from run_pipeline import run_pipeline

    world, model, root = loop_world
    config = config_from_dict(_loop_config(world, model, root / "run"))
    result = run_pipeline(config)
    run = root / "run"
    for folder in (
        "extract",
        "train_labelled",
        "pseudo_caption",
        "extract_sets/pseudo",
        "train",
        "scst",
        "eval",
    ):
        assert (run / folder / "DONE.json").is_file(), folder
    records = list(read_records(run / "pseudo_caption" / "captions.jsonl"))
    assert len(records) == 6 and all(0 < r["confidence"] <= 1 and "beam_agreement" in r for r in records)
    assert FeatureStore.open(run / "extract_sets/pseudo/features.zarr").done_ids() == {
        r["video_id"] for r in records
    }
    log = (run / "train" / "log.txt").read_text()
    assert "mixture of labelled 25.0% (6 videos), pseudo 75.0% (3 videos)" in log  # the confident half
    teacher = json.loads((run / "train_labelled" / "DONE.json").read_text())
    assert teacher["settings"]["data.train_sets"] == []
    assert set(result["metrics"]) == {"ce", "scst"}

    again = run_pipeline(config)
    statuses = {name: info["status"] for name, info in again["stages"].items()}
    assert all(s == "skipped" for n, s in statuses.items() if n != "extract_sets"), statuses

    out = run / "pseudo_caption" / "captions.jsonl"  # as if made by an earlier teacher
    out.write_text(out.read_text().replace(records[0]["caption"], "a stale pseudo label"))
    run_pipeline(config, stages=["pseudo_caption"], force=["pseudo_caption"])
    redone = list(read_records(out))
    assert [r["caption"] for r in redone] == [r["caption"] for r in records]  # captioned anew, not resumed


@pytest.mark.slow
def test_the_loop_killed_at_a_stage_boundary_finishes_when_rerun(loop_world, tmp_path):
    import yaml

    world, model, _ = loop_world
    out = tmp_path / "run"
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(_loop_config(world, model, out)))
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "pseudo_caption" / "DONE.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train" / "DONE.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    statuses = {name: info["status"] for name, info in summary["stages"].items()}
    assert statuses["train_labelled"] == "skipped" and statuses["pseudo_caption"] == "skipped"
    assert statuses["train"] == "ran" and (out / "eval" / "DONE.json").is_file()


def test_bench_pseudo_smoke_run_prints_loader_and_plan_rates():
    args = [sys.executable, str(ROOT / "benchmarks/bench_pseudo.py"), "--loader", "--videos", "8", "--batch", "4",
            "--batches", "3", "--workers", "0", "--plan", "--plan-videos", "2000"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [
        line.split() for line in out.stdout.splitlines() if line.startswith(("single set", "mixture 1:3"))
    ]
    assert len(rows) == 2 and all(float(row[-2]) > 0 for row in rows)
    assert '"steps_per_epoch": 8' in out.stdout  # 20 labelled videos: 1 step of 64, drawn with p = 1/8
