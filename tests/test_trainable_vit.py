"""`model.vit: full` through the stages: `train` learns the ViT from the videos (never from the
cache), the exported model carries it, and `eval` captions with it from the videos."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from pipeline.config import ConfigError
from pipeline.demo.tinyworld import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_cached_config_is_refused_before_anything_runs(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="train.source: cache reads the tokens of the frozen ViT"):
        tiny_config(tiny_world, tmp_path / "run", model={"vit": "full"})


@pytest.mark.slow
def test_train_from_video_updates_and_exports_the_vit_and_eval_reads_videos(tiny_world, tmp_path):
    import stages.eval as eval_stage
    import stages.train as train

    config = tiny_config(
        tiny_world,
        tmp_path / "run",
        model={"vit": "full", "vit_lr_scale": 0.5},
        train={"source": "video", "epochs": 1, "val_max_videos": 2},
        eval={"models": ["ce"], "num_beams": 1, "metrics": ["Bleu"]},
    )
    summary = train.run(config)
    best = config.stage_dir("train") / "best"
    trained = load_file(str(best / "trained.safetensors"))
    key = "blip.vision_model.embeddings.patch_embedding.weight"
    base = Blip2ForConditionalGeneration.from_pretrained(tiny_world["model"]).vision_model
    assert summary["steps"] > 0 and key in trained
    assert not torch.equal(trained[key], base.embeddings.patch_embedding.weight)  # the ViT learned
    assert json.loads((best / "video_model.json").read_text())["model"]["vit"] == "full"
    result = eval_stage.run(config)
    assert result["source"] == "video"  # `auto` never takes the frozen ViT's cache for this model
