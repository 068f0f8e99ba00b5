"""Stage `train`: cross-entropy training of the Q-Former (+ LoRA or the whole LLM) from the cache.

    vidcap train --config configs/msrvtt_t5xl_ce.yaml                      # one process (GPU or CPU)
    torchrun --nproc_per_node 8 run_pipeline.py --config configs/msrvtt_t5xl_ce.yaml --stages train

`train.batch_size` is the global batch and `train.gpu_batch` the per-process micro-batch: 512
and 64 run without accumulation on 8 processes and accumulate 4 micro-batches on 2
(`vidcap plan --gpus N` shows the split). Frame tokens come from the feature cache
(`train.source: cache`, the ViT is not even loaded) or from the videos (`video`: decode + ViT
every step, for comparison or when there is no cache).

Starting weights: `model.pretrained`. What trains is `model.llm` (`frozen`: Q-Former, query
tokens, projection and temporal embeddings; `lora`: + LoRA adapters; `full`: + the whole LLM).
The loop, checkpoints, resume, validation and logs are `pipeline.training.fit`'s; this file
contributes the objective (mean token cross-entropy of one reference caption per video).

Outputs in `<run.output_dir>/train/`: `best/` (the best model by validation CIDEr-D, the folder
`scst`, `eval` and `vidcap caption` load), `checkpoints/`, `metrics.jsonl`, `curves.png`,
`val/epoch_XXX.json` (validation captions), `tensorboard/`, `log.txt`, `DONE.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.mixture import mixture_job
from pipeline.model import VideoCaptioner
from pipeline.optim import LoopSettings
from pipeline.qa import build_qa_job
from pipeline.runtime.distributed import setup_distributed
from pipeline.runtime.files import atomic_write_json
from pipeline.runtime.stage import StageError, stage_entry
from pipeline.training import BEST_SCORE_FILE, best_model_dir, build_job, finish_stage, fit, open_stage


def ce_objective(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean token cross-entropy of the batch's captions (QA: answers to its prompted questions) given its frames."""
    return model.ce_loss(batch["frame_tokens"], batch["captions"], prompts=batch.get("prompts")), {}


@stage_entry("train")
def run(config: Config, force: bool = False) -> dict[str, Any]:
    """Train with cross-entropy; returns the summary (best val CIDEr-D, epochs, steps, seconds, best path)."""

    env = setup_distributed(config.run.device)
    stage = open_stage(config, "train", force, env)
    if stage.done:
        return stage.summary
    torch.manual_seed(config.run.seed)  # identical initial weights (e.g. LoRA) on every rank and re-run
    model = VideoCaptioner.from_pretrained(
        config.model.pretrained, config.model, load_vision=config.train.source == "video", device=env.device
    )
    build = build_qa_job if config.data.task == "qa" else build_job  # QA: questions in, answers out
    job = build(config, model, stage, env, LoopSettings.from_config(config, "train"))
    if config.data.train_sets:  # validation stays on the labelled data; SCST trains on it alone
        job = mixture_job(job, config, model)
    stage.log.info(
        "train: %d videos (%d examples per epoch, %d steps per epoch), %d validation videos, "
        "source %s, llm %s, %d trainable parameters, %d process(es) on %s",
        len(job.plan.videos),
        job.plan.examples_per_epoch,
        job.plan.steps_per_epoch,
        len(job.validation.video_ids),
        config.train.source,
        config.model.llm,
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        env.world_size,
        env.device,
    )
    result = fit(model, ce_objective, job)
    summary = {k: v for k, v in result.items() if k != "history"}
    return finish_stage(stage, env, summary)


# ---------------------------------------------------------------------------------------
# Export (`vidcap export`)
# ---------------------------------------------------------------------------------------


def export_run(run_dir: str | Path, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """Write a model folder from a run's best model (SCST if present, else CE).

    The folder is `VideoCaptioner.save_trained`'s format: `video_model.json` (base model reference
    and the video settings: frames, image size, fusion, prompt...), the trained weights, and the
    LoRA adapter, which load the rest from the base model (hub id, or a local folder that must stay
    where it is); or with `merge_lora` a full BLIP-2 folder with LoRA merged into the LLM, which
    needs nothing else.
    `export.json` records where it came from and its validation CIDEr-D.
    """

    best, out = best_model_dir(run_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise StageError(f"{out} exists and is not empty; choose a new folder")
    if merge_lora:
        VideoCaptioner.from_trained(best, device="cpu").save_trained(out, merge_lora=True)
    else:
        shutil.copytree(best, out, dirs_exist_ok=True)
        (out / BEST_SCORE_FILE).unlink(missing_ok=True)
    score = json.loads((best / BEST_SCORE_FILE).read_text())
    atomic_write_json(
        out / "export.json",
        {"from": str(best.resolve()), "stage": best.parent.name, "merged_lora": merge_lora, **score},
    )
    return out
