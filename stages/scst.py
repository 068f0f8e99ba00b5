"""Stage `scst`: self-critical sequence training with a CIDEr-D reward, from the best CE model.

    vidcap scst --config configs/msrvtt_t5xl_lora_scst.yaml
    torchrun --nproc_per_node 8 run_pipeline.py --config configs/msrvtt_t5xl_lora_scst.yaml --stages scst

SCST as Rennie et al. (2017) and self-critical.pytorch do it. For each video of a batch:

1. sample k = `scst.samples` captions (`generate(do_sample=True)`, no gradient, eval mode);
2. baseline b: the reward of the greedy caption (`scst.baseline: greedy`) or the mean reward of
   the other k-1 samples (`mean`);
3. re-score the sampled token sequences with a teacher-forced forward pass, with gradient and
   in eval mode (no dropout, as sampled), at the sampling temperature and with EOS forbidden
   before `min_new_tokens` as during sampling: log p(sample) summed over its tokens through EOS;
4. reward r: CIDEr-D of each sample against ALL references of its video, with document
   frequencies of the TRAINING references, computed once and cached in `cider_df.npz`;
5. loss = -mean((r - b) * log p(sample)).

QA (`data.task: qa`): the samples are answers to each example's question, the reward is exact
match with the reference answer after the VQA normalisation (`pipeline.qa.ExactMatchReward`: the
metric QA is scored by), lengths are `qa.max_new_tokens` / `qa.min_new_tokens`.

Everything else (DDP, schedule, checkpoints, resume, validation, logs) is `pipeline.training.fit`,
as for `train`. The starting model (`<run>/train/best`) is validated first and competes for
`scst/best/`: if SCST never beats it, `best/` is the CE model and the summary says so.
Outputs in `<run.output_dir>/scst/`: as `train/`, plus `cider_df.npz` (training-set document
frequencies) and `cider_df.npz.sha256` (the references they were computed from).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.annotations import load_manifest
from pipeline.cider import CiderD, DocumentFrequency, cider_d_reward, simple_tokenize
from pipeline.config import Config
from pipeline.model import VideoCaptioner, is_export
from pipeline.optim import LoopSettings
from pipeline.qa import ExactMatchReward, build_qa_job
from pipeline.runtime.distributed import barrier, setup_distributed
from pipeline.runtime.files import atomic_write_bytes
from pipeline.runtime.stage import StageError, stage_entry
from pipeline.training import BEST, build_job, finish_stage, fit, open_stage

DF_FILE = "cider_df.npz"


class ScstObjective:
    """`(model, batch) -> (loss, logs)` for self-critical training.

    `scorer` is anything with `score_candidates(keys, captions) -> np.ndarray` over
    `simple_tokenize`d captions, keys being `batch[keys_from]`: a `CiderD` with the training
    references keyed by video id in the stage, a stub in tests, or for QA (`keys_from="captions"`:
    the batch's reference answers) `pipeline.qa.ExactMatchReward`.
    """

    def __init__(
        self,
        scorer: Any,
        samples: int = 5,
        baseline: str = "greedy",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        keys_from: str = "video_ids",
    ):
        if baseline not in ("greedy", "mean"):
            raise ValueError(f"baseline must be greedy or mean, got {baseline!r}")
        self.scorer, self.k, self.baseline = scorer, samples, baseline
        self.lengths = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        self.sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        self.keys_from = keys_from  # what the scorer looks references up by: video ids, or (QA) the answers

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        frames, keys, k = batch["frame_tokens"], batch[self.keys_from], self.k  # frames (B, T, L, D)
        prompts = batch.get("prompts")  # QA: one question per video
        # The policy we deploy, in eval mode (no dropout), samples and is scored with gradient:
        # REINFORCE needs the log-probs of the distribution that drew the samples.
        model.eval()
        with torch.no_grad():
            sampled = model.generate(
                frames, num_beams=1, num_return_sequences=k, prompts=prompts, **self.sampling, **self.lengths
            )
            greedy = (
                model.generate(frames, num_beams=1, prompts=prompts, **self.lengths)
                if self.baseline == "greedy"
                else None
            )
        samples = [[simple_tokenize(t) for t in sampled.texts[i * k : (i + 1) * k]] for i in range(len(keys))]
        baselines = [simple_tokenize(t) for t in greedy.texts] if greedy is not None else None
        reward, advantage = cider_d_reward(self.scorer, keys, samples, baselines)  # (B, k) each
        logp = model.sequence_logprobs(
            frames,
            sampled.token_ids,
            repeats=k,
            temperature=self.sampling["temperature"],
            min_new_tokens=self.lengths["min_new_tokens"],
            prompts=prompts,
        )  # (B*k,), with grad
        model.train()
        weight = torch.as_tensor(advantage.reshape(-1), dtype=logp.dtype, device=logp.device)
        loss = -(weight * logp).mean()
        logs = {
            "reward": float(reward.mean()),
            "baseline": float((reward - advantage).mean()),
            "advantage_std": float(advantage.std()),
            "sample_words": float(np.mean([len(s.split()) for row in samples for s in row])),
            "sample_logprob": logp.detach().mean(),
        }
        return loss, logs


def training_scorer(references: dict[str, Sequence[str]], cache: Path, env: Any) -> CiderD:
    """CIDEr-D over all training references, df computed once by rank 0 and cached in `cache`.

    The cache is reused only for the very same tokenised references (their SHA-256 sits beside
    it), so other annotations or another tokenisation never score with stale frequencies.
    """
    tokenised = {v: [simple_tokenize(c) for c in caps] for v, caps in references.items() if caps}
    digest = hashlib.sha256(json.dumps(sorted(tokenised.items())).encode()).hexdigest()
    stamp = cache.with_name(cache.name + ".sha256")
    if env.master_process and not _df_matches(cache, stamp, digest):
        tmp = cache.with_name(f".{cache.stem}.tmp.npz")
        CiderD(tokenised).save(tmp)
        os.replace(tmp, cache)
        atomic_write_bytes(stamp, digest.encode())  # written last: the pair is complete
    barrier(env)
    return CiderD(tokenised, df=DocumentFrequency.load(cache))


def _df_matches(cache: Path, stamp: Path, digest: str) -> bool:
    try:
        return stamp.read_text() == digest and cache.is_file()
    except OSError:
        return False


@stage_entry("scst")
def run(config: Config, force: bool = False) -> dict[str, Any]:
    """Self-critical training from `<run>/train/best`; returns the summary (best val CIDEr-D, whether SCST beat CE)."""

    env = setup_distributed(config.run.device)
    stage = open_stage(config, "scst", force, env)
    if stage.done:
        return stage.summary
    start = config.stage_dir("train") / BEST
    if not is_export(start):
        raise StageError(
            f"scst starts from the best CE model, but {start} does not exist: run the train stage first"
        )
    torch.manual_seed(config.run.seed)
    model = VideoCaptioner.from_trained(start, device=env.device, load_vision=config.train.source == "video")
    s = config.scst
    if config.data.task == "qa":  # reward: exact match with the answer, the metric QA is scored by
        job = build_qa_job(
            config, model, stage, env, LoopSettings.from_config(config, "scst"), start_is_candidate=True
        )
        lengths = dict(max_new_tokens=config.qa.max_new_tokens, min_new_tokens=config.qa.min_new_tokens)
        scorer, keys_from = ExactMatchReward(), "captions"
    else:
        job = build_job(
            config, model, stage, env, LoopSettings.from_config(config, "scst"), start_is_candidate=True
        )
        manifest = load_manifest(config.data)
        scorer = training_scorer(manifest.references(config.data.train_split), stage.dir / DF_FILE, env)
        lengths = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=config.eval.min_new_tokens)
        keys_from = "video_ids"
    objective = ScstObjective(
        scorer, s.samples, s.baseline, s.temperature, s.top_k, s.top_p, **lengths, keys_from=keys_from
    )
    stage.log.info(
        "scst from %s: %d videos, %d steps per epoch, k=%d samples, %s baseline",
        start,
        len(job.plan.videos),
        job.plan.steps_per_epoch,
        s.samples,
        s.baseline,
    )
    result = fit(model, objective, job)
    summary = {k: v for k, v in result.items() if k != "history"}
    summary["ce_val_cider"] = result["start_val_cider"]
    summary["improved_over_ce"] = result["best_epoch"] > 0
    summary["started_from"] = str(start)
    if not summary["improved_over_ce"]:
        stage.log.warning(
            "SCST never beat the CE model's validation CIDEr-D (%.4f): best/ is the CE model",
            result["start_val_cider"],
        )
    return finish_stage(stage, env, summary)
