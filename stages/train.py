"""Stage `train`: cross-entropy training of the Q-Former (+ LoRA or the whole LLM) from the cache.

    vidcap train --config configs/msrvtt_t5xl_ce.yaml                      # one process (GPU or CPU)
    torchrun --nproc_per_node 8 run_pipeline.py --config configs/msrvtt_t5xl_ce.yaml --stages train

`train.batch_size` is the global batch: with 8 processes and `train.grad_accum: 2`, each
process runs micro-batches of batch_size / 16. Frame tokens come from the feature cache
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
from pipeline.data import TrainPlan, make_source
from pipeline.distributed import setup_distributed
from pipeline.optim import LoopSettings
from pipeline.stage import StageError, atomic_write_json
from pipeline.training import BEST, BEST_SCORE_FILE, Job, Validation, finish_stage, fit, open_stage


def ce_objective(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean token cross-entropy of the batch's captions given its frames."""
    return model.ce_loss(batch["frame_tokens"], batch["captions"]), {}


def run(config: Config, force: bool = False) -> dict[str, Any]:
    """Train with cross-entropy; returns the summary (best val CIDEr-D, epochs, steps, seconds, best path)."""
    from pipeline.model import VideoCaptioner

    env = setup_distributed(config.run.device)
    stage = open_stage(config, "train", force, env)
    if stage.done:
        return stage.summary
    torch.manual_seed(config.run.seed)  # identical initial weights (e.g. LoRA) on every rank and re-run
    model = VideoCaptioner.from_pretrained(
        config.model.pretrained, config.model, load_vision=config.train.source == "video", device=env.device
    )
    job = build_job(
        config, model, stage, env, LoopSettings.from_train(config), captions=config.train.captions
    )
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


def build_job(
    config: Config,
    model: Any,
    stage: Any,
    env: Any,
    settings: LoopSettings,
    captions: str = "sample",
    start_is_candidate: bool = False,
) -> Job:
    """The data (from `train.source`), validation set and loop settings shared by `train` and `scst`."""
    from pipeline.annotations import load_manifest

    source_kind = config.train.source
    manifest = load_manifest(config.data)
    train_records = manifest.split(config.data.train_split)
    val_records = manifest.split(config.data.val_split)
    source = make_source(config, model, train_records + val_records, source_kind)
    available = set(source.available([r.video_id for r in train_records + val_records]))
    skipped = [r.video_id for r in train_records + val_records if r.video_id not in available]
    if skipped:
        stage.log.warning(
            "%d videos are not in the %s (failed or not extracted), e.g. %s; training without them",
            len(skipped),
            source_kind,
            ", ".join(skipped[:5]),
        )
    train_records = [r for r in train_records if r.video_id in available]
    val_ids = [r.video_id for r in val_records if r.video_id in available and r.captions]
    if config.train.val_max_videos:
        val_ids = val_ids[: config.train.val_max_videos]
    if not train_records:
        raise StageError(
            f"no training video of split {config.data.train_split!r} is available from the {source_kind}"
        )
    plan = TrainPlan(
        train_records, config.run.seed, captions, num_views=source.num_views, global_batch=settings.batch_size
    )
    validation = Validation(
        val_ids,
        {r.video_id: list(r.captions) for r in val_records},
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        min_new_tokens=config.eval.min_new_tokens,
    )
    return Job(
        plan,
        source,
        settings,
        validation,
        stage.dir,
        env,
        stage.log,
        fingerprint_settings=stage.settings,
        start_is_candidate=start_is_candidate,
    )


# ---------------------------------------------------------------------------------------
# Export (`vidcap export`)
# ---------------------------------------------------------------------------------------


def best_model_dir(run_dir: str | Path) -> Path:
    """`<run>/scst/best` when SCST ran, else `<run>/train/best`."""
    run_dir = Path(run_dir)
    for stage in ("scst", "train"):
        if (run_dir / stage / BEST / BEST_SCORE_FILE).is_file():
            return run_dir / stage / BEST
    raise StageError(
        f"{run_dir} holds no trained model (no scst/best/ nor train/best/): run the train stage first"
    )


def export_run(run_dir: str | Path, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """Write a self-contained model folder from a run's best model (SCST if present, else CE).

    The folder is `VideoCaptioner.save_trained`'s format: `video_model.json` (base model reference
    and the video settings: frames, image size, fusion, prompt...), the trained weights, and the
    LoRA adapter, or with `merge_lora` a full BLIP-2 folder with LoRA merged into the LLM.
    `export.json` records where it came from and its validation CIDEr-D.
    """
    from pipeline.model import VideoCaptioner

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
