"""`caption` as a pipeline stage: the run's best model captions `caption.inputs` into its folder."""

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.demo.synth import make_synthetic_world
from pipeline.demo.testmodels import init_model
from run_pipeline import run_pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_stage")
    world = make_synthetic_world(root / "world", num_videos=12, seed=5, frames=8, size=32)
    model = init_model(root / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    raw = {
        "run": {"output_dir": str(root / "run"), "device": "cpu", "stages": ["extract", "train", "caption"]},
        "data": {"annotations": str(world["annotations"]), "video_root": str(world["videos"])},
        "decode": {"backend": "pyav"},
        "model": {"pretrained": str(model), "num_frames": 4, "image_size": 32, "llm": "full"},
        "train": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "num_workers": 0},
        "eval": {"max_new_tokens": 6, "min_new_tokens": 1},
        "caption": {
            "inputs": [str(world["videos"])],
            "num_beams": 1,
            "max_new_tokens": 6,
            "min_new_tokens": 1,
        },
    }
    return root, world, raw, run_pipeline(config_from_dict(raw))


def test_caption_stage_captions_every_input_with_the_best_model(trained):
    root, world, _, result = trained
    summary = result["stages"]["caption"]["summary"]
    records = [json.loads(line) for line in (root / "run/caption/captions.jsonl").read_text().splitlines()]
    videos = sorted(str(p.resolve()) for p in Path(world["videos"]).glob("*.mp4"))
    assert sorted(r["video"] for r in records) == videos and all(r.get("caption") for r in records)
    assert summary["captioned"] == len(videos) and summary["model"] == str(root / "run/train/best")
    done = json.loads((root / "run/caption/DONE.json").read_text())
    assert done["summary"]["captioned"] == len(videos)


def test_a_finished_caption_stage_is_skipped_and_a_retrained_model_makes_it_stale(trained):
    _, _, raw, _ = trained
    again = run_pipeline(config_from_dict(raw))
    assert again["stages"]["caption"]["status"] == "skipped"
    changed = {**raw, "train": {**raw["train"], "lr": 3e-4}}
    with pytest.raises(Exception, match="already finished"):
        run_pipeline(config_from_dict(changed), stages=["caption"])  # its upstream train changed


def test_caption_stage_without_inputs_is_a_config_error(trained):
    _, _, raw, _ = trained
    empty = {**raw, "caption": {**raw["caption"], "inputs": []}}
    with pytest.raises(ConfigError, match="caption.inputs"):
        run_pipeline(config_from_dict(empty), stages=["caption"])
