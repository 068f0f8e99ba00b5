"""The tiny model's image-text pretraining: it learns, and the result is a plain BLIP-2 folder."""

import json

import numpy as np
import torch
from transformers import Blip2ForConditionalGeneration

from pipeline.demo.synth import synth_vocabulary
from pipeline.demo.testmodels import init_model
from pipeline.demo.tinypretrain import PRETRAIN_FILE, frame_caption, pretrain_tiny_model, sample_frames


def test_sample_frames_are_resized_and_captioned_by_content():
    frames, captions = sample_frames(6, 32, np.random.default_rng(0))
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    vocab = set(synth_vocabulary())
    assert all(set(c.split()) <= vocab for c in captions)
    assert all(len(c.split()) == 3 for c in captions)  # "a <colour> <shape>": no motion words
    assert frame_caption("red", "circle") == "a red circle"


def test_pretraining_lowers_the_loss_and_saves_a_plain_blip2(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(synth_vocabulary()))
    model_dir = init_model(tmp_path / "tiny", "tiny-t5", vocab_from=words)
    before = Blip2ForConditionalGeneration.from_pretrained(model_dir).qformer.state_dict()
    torch.set_num_threads(1)
    record = pretrain_tiny_model(model_dir, steps=60, batch_size=16, lr=2e-3)
    assert record["final_loss"] < 0.5 * record["first_loss"]
    assert json.loads((model_dir / PRETRAIN_FILE).read_text())["steps"] == 60
    after = Blip2ForConditionalGeneration.from_pretrained(model_dir).qformer.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the Q-Former weights saved in the folder did not change"
