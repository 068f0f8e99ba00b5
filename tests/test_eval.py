"""Stage `eval` on a synthetic world and a tiny random BLIP-2: predictions, metrics, sources, resume."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.config import config_from_dict
from pipeline.published import PUBLISHED, format_table
from pipeline.runtime.stage import StageError

COCO_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
FAST_METRICS = ["Bleu", "ROUGE_L", "CIDEr"]
CORRUPT = 1  # index in the test split of the video overwritten with garbage


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 videos (2 train, 1 val, 5 test), one test video corrupt, and a tiny T5 BLIP-2."""
    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model

    out = tmp_path_factory.mktemp("eval_world")
    summary = make_synthetic_world(out, num_videos=8, seed=1, frames=8, size=32, splits=(0.25, 0.125, 0.625))
    rows = [json.loads(line) for line in Path(summary["annotations"]).read_text().splitlines()]
    test_ids = [r["video_id"] for r in rows if r["split"] == "test"]
    corrupt = test_ids[CORRUPT]
    (out / "videos" / f"{corrupt}.mp4").write_bytes(b"not a video at all" * 50)
    model = init_model(out / "model", "tiny-t5", vocab_from=summary["annotations"], seed=0)
    return {"root": out, "annotations": summary["annotations"], "model": str(model), "test_ids": test_ids,
            "corrupt": corrupt}  # fmt: skip


def make_config(world, run_dir, cache=None, **eval_keys):
    return config_from_dict(
        {
            "run": {"output_dir": str(run_dir), "device": "cpu"},
            "data": {
                "format": "jsonl",
                "annotations": world["annotations"],
                "video_root": str(world["root"] / "videos"),
            },  # fmt: skip
            "decode": {"backend": "pyav"},
            "model": {"pretrained": world["model"], "num_frames": 4, "image_size": 32},
            "cache": cache or {},
            "extract": {"batch_size": 4, "decode_workers": 1, "splits": ["test"]},
            "eval": {
                "models": ["zero_shot"],
                "batch_size": 3,
                "num_beams": 2,
                "max_new_tokens": 8,
                "min_new_tokens": 2,
                **eval_keys,
            },  # fmt: skip
        }
    )


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def video_run(world, tmp_path_factory):
    """zero_shot and a `ce` export, from raw videos."""
    from pipeline.model import VideoCaptioner
    from stages import eval as eval_stage

    run_dir = tmp_path_factory.mktemp("video_run")
    # METEOR's JVM takes ~20 s to start on a busy 2-core machine: it runs once, in the cache test.
    config = make_config(world, run_dir, models=["zero_shot", "ce"], source="auto", metrics=FAST_METRICS)
    model = VideoCaptioner.from_pretrained(world["model"], config.model)
    model.save_trained(config.stage_dir("train") / "best")
    return config, eval_stage.run(config)


def check_metrics(metrics, keys, num_videos):
    assert set(metrics) >= keys
    assert all(isinstance(metrics[k], float) and 0.0 <= metrics[k] <= 1.0 for k in keys - {"CIDEr"})
    assert 0.0 <= metrics["CIDEr"] <= 10.0  # CIDEr-D is 10 x a cosine similarity
    assert metrics["num_videos"] == num_videos


def test_every_good_video_gets_a_caption_and_every_model_its_metrics(world, video_run):
    config, summary = video_run
    good = [v for v in world["test_ids"] if v != world["corrupt"]]
    assert summary["split"] == "test" and summary["source"] == "video"
    assert set(summary["metrics"]) == {"zero_shot", "ce"}
    for name in ("zero_shot", "ce"):
        predictions = read_json(summary["predictions"][name])
        assert [p["video_id"] for p in predictions] == good  # split order, corrupt one left out
        assert all(isinstance(p["caption"], str) and p["caption"] for p in predictions)
        metrics = read_json(config.stage_dir("eval") / name / "metrics.json")
        check_metrics(metrics, COCO_KEYS - {"METEOR"}, len(good))
    # same weights, same frames: the CE export of the untrained model captions identically
    assert read_json(summary["predictions"]["ce"]) == read_json(summary["predictions"]["zero_shot"])


def test_a_corrupt_video_is_reported_not_fatal(world, video_run):
    config, _ = video_run
    failed = read_json(config.stage_dir("eval") / "zero_shot" / "metrics.json")["failed"]
    assert [f["video_id"] for f in failed] == [world["corrupt"]]
    assert failed[0]["reason"]


def test_second_run_skips(world, video_run, monkeypatch):
    from stages import eval as eval_stage

    config, summary = video_run
    monkeypatch.setattr(
        eval_stage, "load_model", lambda *a, **k: pytest.fail("a finished eval loaded a model")
    )
    again = eval_stage.run(config)
    assert again["metrics"] == summary["metrics"]
    assert "already done" in (config.stage_dir("eval") / "log.txt").read_text()


def test_a_killed_run_resumes_where_it_stopped(world, video_run, monkeypatch):
    """Killed in `ce` after its first batch (a torn line after it): zero_shot is kept, ce goes on."""
    import pipeline.metrics
    from stages import eval as eval_stage

    config, summary = video_run
    ce_dir = config.stage_dir("eval") / "ce"
    predictions = read_json(ce_dir / "predictions.json")
    identity = read_json(ce_dir / "metrics.json")["identity"]
    for name in ("DONE.json", "ce/metrics.json", "ce/predictions.json"):
        (config.stage_dir("eval") / name).unlink()
    rows = [{"identity": identity}, *predictions[:2], {"video_id": world["corrupt"], "error": "unreadable"}]
    lines = [json.dumps(row) for row in rows] + ['{"video_id": "synth00']  # torn by the kill
    (ce_dir / eval_stage.PARTIAL_FILE).write_text("\n".join(lines))

    loaded, captioned = [], []
    real_load, real_caption, real_scores = (
        eval_stage.load_model,
        eval_stage._caption,
        pipeline.metrics.coco_scores,
    )
    monkeypatch.setattr(
        eval_stage, "load_model", lambda c, spec, *a: loaded.append(spec.name) or real_load(c, spec, *a)
    )
    monkeypatch.setattr(
        eval_stage, "_caption", lambda m, t, c: captioned.append(len(t)) or real_caption(m, t, c)
    )
    # METEOR's JVM is slow to start on a busy machine, and the ce scores below need only CIDEr.
    monkeypatch.setattr(eval_stage, "coco_scores", lambda g, r, metrics: real_scores(g, r, ("CIDEr",)))
    again = eval_stage.run(config)
    assert loaded == ["ce"] and sum(captioned) == len(predictions) - 2
    assert read_json(ce_dir / "predictions.json") == predictions
    assert again["metrics"]["ce"]["CIDEr"] == pytest.approx(summary["metrics"]["ce"]["CIDEr"])
    assert again["metrics"]["zero_shot"] == summary["metrics"]["zero_shot"]
    assert not (ce_dir / eval_stage.PARTIAL_FILE).exists()


def test_a_retrained_checkpoint_is_evaluated_again(world, video_run, monkeypatch):
    """Same settings (fingerprint), new weights in train/best: only `ce` is redone."""
    import os

    import pipeline.metrics
    from stages import eval as eval_stage

    config, _ = video_run
    weights = config.stage_dir("train") / "best" / "trained.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    loaded = []
    real_load, real_scores = eval_stage.load_model, pipeline.metrics.coco_scores
    monkeypatch.setattr(
        eval_stage, "load_model", lambda c, spec, *a: loaded.append(spec.name) or real_load(c, spec, *a)
    )
    monkeypatch.setattr(eval_stage, "coco_scores", lambda g, r, metrics: real_scores(g, r, ("CIDEr",)))
    eval_stage.run(config)
    assert loaded == ["ce"]
    eval_stage.run(config)  # and now it is current again
    assert loaded == ["ce"]


@pytest.fixture(scope="module")
def cache_path(world, tmp_path_factory):
    """The test split's tokens extracted by stage `extract`; the corrupt video recorded as failed."""
    from stages import extract

    path = tmp_path_factory.mktemp("cache") / "features.zarr"
    extract.run(make_config(world, path.parent / "run", cache={"path": str(path)}))
    return str(path)


def test_cache_and_video_give_the_same_captions_and_all_seven_metrics(world, video_run, cache_path, tmp_path):
    from stages import eval as eval_stage

    _, video_summary = video_run
    config = make_config(world, tmp_path / "run", cache={"path": cache_path})  # the default metrics
    summary = eval_stage.run(config)
    assert summary["source"] == "cache"
    predictions = read_json(summary["predictions"]["zero_shot"])
    assert predictions == read_json(video_summary["predictions"]["zero_shot"])
    metrics = read_json(config.stage_dir("eval") / "zero_shot" / "metrics.json")
    check_metrics(metrics, COCO_KEYS, len(predictions))
    assert [f["video_id"] for f in metrics["failed"]] == [world["corrupt"]]
    assert "extract failed" in metrics["failed"][0]["reason"]


def test_each_video_is_captioned_from_its_own_frames_with_either_source(
    world, cache_path, tmp_path, monkeypatch
):
    """A tiny random model says much the same of every video, so caption the tokens' norm instead."""
    from stages import eval as eval_stage

    monkeypatch.setattr(
        eval_stage, "_caption", lambda model, tokens, config: [f"{t.norm():.6f}" for t in tokens]
    )
    digests = {}
    for source in ("video", "cache"):
        config = make_config(
            world,
            tmp_path / source,
            source=source,
            batch_size=2,
            cache={"path": cache_path},
            metrics=["CIDEr"],
        )
        summary = eval_stage.run(config)
        digests[source] = {
            p["video_id"]: float(p["caption"]) for p in read_json(summary["predictions"]["zero_shot"])
        }
    assert list(digests["video"]) == list(digests["cache"])
    assert len(set(digests["video"].values())) == len(digests["video"])  # the videos differ
    for video_id, norm in digests["video"].items():
        assert digests["cache"][video_id] == pytest.approx(norm, rel=1e-3)  # float16 in the cache


def test_models_without_checkpoints_are_skipped_but_a_missing_folder_is_an_error(world, tmp_path):
    import logging

    from stages.eval import resolve_models

    log = logging.getLogger("test")
    specs = resolve_models(make_config(world, tmp_path, models=["zero_shot", "ce", "scst"]), log)
    assert [s.name for s in specs] == ["zero_shot"]
    with pytest.raises(StageError, match="no_such_model"):
        resolve_models(make_config(world, tmp_path, models=[str(tmp_path / "no_such_model")]), log)


def test_source_cache_without_a_cache_is_an_error(world, tmp_path):
    from stages import eval as eval_stage

    with pytest.raises(StageError, match="eval.source=video"):
        eval_stage.run(make_config(world, tmp_path / "run", source="cache"))


def test_missing_java_is_a_clear_error(world, tmp_path, monkeypatch):
    from pipeline.app.cli import main
    from pipeline.metrics import JavaNotFoundError
    from stages import eval as eval_stage

    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(JavaNotFoundError, match="java"):
        eval_stage.run(make_config(world, tmp_path / "run"))

    config_file = tmp_path / "eval.json"  # JSON is YAML
    config_file.write_text(json.dumps(make_config(world, tmp_path / "cli_run").to_dict()))
    result = CliRunner().invoke(main, ["eval", "--config", str(config_file)])
    assert result.exit_code != 0
    assert "java" in result.output.lower() and "Traceback" not in result.output
    assert not isinstance(result.exception, JavaNotFoundError)  # click turned it into a message


def test_table_shows_ours_and_the_papers_numbers():
    ours = {"ce": {"Bleu_4": 0.5, "METEOR": 0.3, "ROUGE_L": 0.6, "CIDEr": 0.75, "num_videos": 3}}
    table = format_table(ours, "msrvtt", "test")
    row = next(line for line in table.splitlines() if line.startswith("ce "))
    assert row.split()[1:] == ["50.0", "30.0", "60.0", "75.0"]
    assert "79.5" in table and "52.4" in table and "34.2" in table and "68.3" in table  # LoRA + SCST
    assert "73.6" in table and "50.8" in table and "80.0" in table
    assert "168.0" in format_table(ours, "msvd") and "87.1" in format_table(ours, "vatex")
    assert "79.5" not in format_table(ours, "jsonl")
    assert all(0 < v <= 200 for rows in PUBLISHED.values() for r in rows for v in r.metrics.values())
