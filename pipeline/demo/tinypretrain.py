"""Image-text pretraining of a tiny random BLIP-2 on single synthetic frames.

Real BLIP-2 reaches video captioning already knowing how to describe an image: its Q-Former
and language model were pretrained on image-text pairs. A freshly initialised tiny model
knows nothing, and a frozen random language model cannot be steered into captions within
the demo's few CPU minutes. So, once, we give the tiny model the same head start BLIP-2 had:
a short image-captioning run on single frames of synthetic scenes, captioned with what one
frame can show ("a red circle") and never the motion, which only the video fine-tuning can
teach. The ViT stays frozen and random, as BLIP-2's ViT is frozen.

The result is saved in place as an ordinary Hugging Face BLIP-2 folder, so the pipeline
loads it with `from_pretrained` exactly as it would load `Salesforce/blip2-flan-t5-xl`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.demo.synth import draw_scenes, render_scene
from pipeline.model import VideoCaptioner
from pipeline.sampling import normalize_frames
from pipeline.video import _resize

PRETRAIN_FILE = "tiny_pretraining.json"


def frame_caption(color: str, shape: str) -> str:
    """What a single frame shows: colour and shape, no motion."""
    return f"a {color} {shape}"


def sample_frames(num: int, image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """`num` single frames of random scenes at random moments, resized as the eval view is."""
    scenes = draw_scenes(num, rng)
    frames, captions = [], []
    for scene in scenes:
        video = render_scene(scene)  # (16, 64, 64, 3)
        frame = video[rng.integers(len(video))][None]  # (1, 64, 64, 3)
        frames.append(_resize(frame, image_size, (0, 0, frame.shape[2], frame.shape[1]))[0])
        captions.append(frame_caption(scene.color, scene.shape))
    return np.stack(frames), captions


def pretrain_tiny_model(
    model_dir: str | Path,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    image_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Train Q-Former + LM of the BLIP-2 in `model_dir` on frame captions; save it back in place."""

    model_dir = Path(model_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(pretrained=str(model_dir), num_frames=1, image_size=image_size, llm="full")
    model = VideoCaptioner.from_pretrained(model_dir, cfg, load_vision=True)
    # A pool of frames encoded once: the ViT is frozen, so its tokens never change.
    pixels, captions = sample_frames(max(4 * batch_size, 512), image_size, rng)
    tokens = model.encode_frames(normalize_frames(pixels)[:, None])  # (N, 1, L, D)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    first = last = float("nan")
    for step in range(steps):
        batch = rng.choice(len(captions), size=batch_size, replace=False)
        loss = model.ce_loss(tokens[batch], [captions[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        first = loss.item() if step == 0 else first
        last = 0.9 * last + 0.1 * loss.item() if step > 0 else loss.item()
    model.train(False)
    model.blip.save_pretrained(str(model_dir))
    model.tokenizer.save_pretrained(str(model_dir))
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "first_loss": first, "final_loss": last}
    (model_dir / PRETRAIN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
