"""The shared training mechanism: sources, data plan, optimiser groups, LR schedule, trainable sets.

Most tests run on the session's `tiny_world` (tests/conftest.py): a tiny random BLIP-2 (T5 flavour)
and a feature cache of its ViT tokens (3 views: evaluation + 2 augmented).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.checkpoints import rng_state, set_rng_state
from pipeline.config import ModelConfig
from pipeline.data import CacheSource, Sharding, TrainPlan, VideoSource
from pipeline.demo.tinyworld import IMAGE_SIZE, NUM_FRAMES, TRAIN_VIEWS, tiny_config
from pipeline.optim import LoopSettings, WarmupCosine, build_optimizer, param_groups


def _model(world, load_vision=False, **settings):
    from pipeline.model import VideoCaptioner

    cfg = ModelConfig(pretrained=world["model"], num_frames=NUM_FRAMES, image_size=IMAGE_SIZE, **settings)
    torch.manual_seed(0)
    return VideoCaptioner.from_pretrained(world["model"], cfg, load_vision=load_vision)


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


def test_ce_loss_from_cache_equals_loss_from_video(tiny_world):
    from cache.store import FeatureStore
    from pipeline.annotations import load_manifest

    config = tiny_config(tiny_world, "unused")
    model = _model(tiny_world, load_vision=True)
    records = load_manifest(config.data).split("train")[:3]
    ids, views = [r.video_id for r in records], [0, 1, 2]
    captions = ["a red square moves left", "a blue circle is moving up", "the green triangle goes down"]
    cache = CacheSource(FeatureStore.open(tiny_world["cache"]))
    video = VideoSource(records, model, config.decode, config.model, seed=config.run.seed, num_views=3)
    from_cache = cache.frame_tokens(ids, views)  # (B, T, L, D) float32, from float16
    from_video = video.frame_tokens(ids, views)
    assert from_cache.shape == from_video.shape == (3, NUM_FRAMES, 17, 32)
    assert from_cache.dtype == from_video.dtype == torch.float32
    torch.testing.assert_close(from_cache, from_video, rtol=2e-3, atol=2e-3)  # float16 rounding
    with torch.no_grad():
        loss_cache, loss_video = model.ce_loss(from_cache, captions), model.ce_loss(from_video, captions)
    assert abs(loss_cache.item() - loss_video.item()) < 1e-3 * loss_video.item()
    # different views really are different frames (the test would be vacuous otherwise)
    assert not torch.allclose(from_video[0], video.frame_tokens(ids[:1], [1])[0], atol=1e-2)


def test_cache_source_lists_only_done_videos(tiny_world):
    from cache.store import FeatureStore

    source = CacheSource(FeatureStore.open(tiny_world["cache"]))
    assert source.num_views == 1 + TRAIN_VIEWS
    assert source.available(["synth0000", "nope"]) == ["synth0000"]


def test_a_cache_of_other_shapes_is_refused_with_the_differences(tiny_world):
    from cache.store import StoreError
    from pipeline.data import make_source

    config = tiny_config(tiny_world, "unused", model={"num_frames": 3}, cache={"train_views": 1})
    with pytest.raises(
        StoreError, match=r"(?s)frames: cache 4, config/model 3.*views: cache 3, config/model 2"
    ):
        make_source(config, None, [], "cache")


# ---------------------------------------------------------------------------------------
# Data plan
# ---------------------------------------------------------------------------------------


def _records(n=10, captions=3):
    from pipeline.annotations import VideoRecord

    return [
        VideoRecord(f"v{i}", f"/x/v{i}.mp4", "train", tuple(f"Caption {j} of v{i}." for j in range(captions)))
        for i in range(n)
    ]


def test_plan_is_a_function_of_seed_and_epoch():
    plan = TrainPlan(_records(), seed=1, captions="sample", num_views=3, global_batch=4)
    assert plan.steps_per_epoch == 3  # ceil(10 / 4): the last batch wraps around
    first, again, other = plan.epoch(0), TrainPlan(_records(), 1, "sample", 3, 4).epoch(0), plan.epoch(1)
    assert first == again and first != other
    assert len(first) == 12 and {e.video_id for e in first} == {f"v{i}" for i in range(10)}
    assert {e.view for e in first} <= {1, 2} and len({e.view for e in first}) == 2
    assert all(e.caption.startswith("caption ") and not e.caption.endswith(".") for e in first)  # cleaned
    assert {e.view for e in TrainPlan(_records(), 1, "sample", num_views=1, global_batch=4).epoch(0)} == {0}


def test_plan_all_captions_covers_every_pair():
    plan = TrainPlan(_records(5, 3), seed=0, captions="all", global_batch=5)
    examples = plan.epoch(0)
    assert plan.steps_per_epoch == 3 and len({(e.video_id, e.caption) for e in examples}) == 15


def test_ranks_split_each_global_batch_without_overlap():
    plan = TrainPlan(_records(16), seed=0, global_batch=8)
    shards = [plan.micro_batches(0, Sharding(8, world_size=2, rank=r, grad_accum=2)) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]  # 2 steps x 2 micro-batches of 2
    whole = plan.epoch(0)
    for step in range(2):
        got = [e for rank in range(2) for e in shards[rank][2 * step] + shards[rank][2 * step + 1]]
        assert got == whole[8 * step : 8 * (step + 1)]
    resumed = plan.micro_batches(0, Sharding(8, 2, 1, 2), start_step=1)
    assert resumed == shards[1][2:]


def test_batch_split_error_names_the_keys():
    from pipeline.config import TrainConfig

    assert TrainConfig(batch_size=64, grad_accum=2).accumulation(8) == (4, 2)
    with pytest.raises(ValueError, match=r"train.batch_size \(12\).*WORLD_SIZE \(8\).*train.grad_accum"):
        TrainConfig(batch_size=12).accumulation(8)


# ---------------------------------------------------------------------------------------
# Optimiser, schedule, RNG
# ---------------------------------------------------------------------------------------


def test_lr_schedule_warmup_peak_cosine_end():
    schedule = WarmupCosine(lr=5e-5, min_lr=1e-5, warmup_lr=1e-8, warmup_steps=100, total_steps=1000)
    assert schedule.lr_at(0) == pytest.approx(1e-8)
    assert schedule.lr_at(50) == pytest.approx((1e-8 + 5e-5) / 2)
    assert schedule.lr_at(100) == pytest.approx(5e-5)
    assert schedule.lr_at(550) == pytest.approx(3e-5)  # half way down the cosine
    assert schedule.lr_at(1000) == pytest.approx(1e-5)
    lrs = [schedule.lr_at(s) for s in range(1001)]
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:101], strict=False)) and all(
        a >= b for a, b in zip(lrs[100:], lrs[101:], strict=False)
    )
    # through the real optimizer and LambdaLR
    model = torch.nn.Linear(2, 2)
    settings = LoopSettings(
        epochs=1,
        batch_size=1,
        lr=5e-5,
        min_lr=1e-5,
        warmup_lr=1e-8,
        warmup_steps=100,
        weight_decay=0.05,
        grad_clip=1,
        checkpoint_every=1,
        log_every=1,
        seed=0,
    )
    optimizer, scheduler = build_optimizer(model, settings, total_steps=1000)
    seen = []
    for _ in range(1000):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-8) and seen[100] == pytest.approx(5e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5) and math.isclose(
        seen[-1], 1e-5, rel_tol=1e-3
    )


def test_no_weight_decay_on_biases_norms_embeddings_query_tokens(tiny_world):
    model = _model(tiny_world, temporal_embeddings=True)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, skipped = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "blip.query_tokens" in skipped and "temporal_embeddings" in skipped
    assert any("layernorm" in n.lower() or "LayerNorm" in n for n in skipped)
    assert all(not n.endswith(".bias") for n in decayed) and any(n.endswith(".bias") for n in skipped)
    assert "blip.language_projection.weight" in decayed
    assert any("qformer" in n and "attention" in n and n.endswith("weight") for n in decayed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | skipped == trainable and not decayed & skipped


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------


def _expected_trainable(model, llm: str, lora_r: int = 8) -> int:
    blip = model.blip
    count = sum(p.numel() for p in blip.qformer.parameters()) + blip.query_tokens.numel()
    count += sum(p.numel() for p in blip.language_projection.parameters())
    if llm == "full":
        count += sum(p.numel() for n, p in blip.language_model.named_parameters() if "lora_" not in n)
    if llm == "lora":  # r x (in + out) per wrapped q / v projection of every attention block
        linears = [
            m
            for n, m in model.language_model.named_modules()
            if n.split(".")[-1] in ("q", "v") and hasattr(m, "base_layer")
        ]
        assert linears
        count += sum(lora_r * (m.base_layer.in_features + m.base_layer.out_features) for m in linears)
    return count


@pytest.mark.parametrize("llm", ["frozen", "lora", "full"])
def test_each_llm_mode_trains_exactly_its_parameters(tiny_world, llm):
    model = _model(tiny_world, llm=llm)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _expected_trainable(model, llm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = LoopSettings(
        epochs=1,
        batch_size=2,
        lr=1e-2,
        min_lr=1e-2,
        warmup_steps=0,
        weight_decay=0.05,
        grad_clip=1.0,
        checkpoint_every=1,
        log_every=1,
        seed=0,
    )
    optimizer, _ = build_optimizer(model, settings, total_steps=1)
    model.train()
    tokens = torch.randn(2, NUM_FRAMES, 17, 32)
    model.ce_loss(tokens, ["a red square moves left", "a blue circle moves up"]).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed <= trainable  # nothing frozen moved
    assert any("qformer" in n for n in changed) and "blip.query_tokens" in changed
    assert any("language_projection" in n for n in changed)
    lm_changed = {n for n in changed if "language_model" in n}
    if llm == "frozen":
        assert not lm_changed
    elif llm == "lora":
        assert lm_changed and all("lora_" in n for n in lm_changed)
    else:
        assert any("lora_" not in n for n in lm_changed) and len(lm_changed) > 10


def test_temporal_embeddings_get_their_own_learning_rate(tiny_world):
    model = _model(tiny_world, temporal_embeddings=True)
    groups = param_groups(model, 0.05, {"temporal_embeddings": 10.0})
    assert len(groups) == 3 and groups[2]["lr_scale"] == 10.0 and groups[2]["weight_decay"] == 0.0
    assert [p.shape for p in groups[2]["params"]] == [model.temporal_embeddings.shape]
    assert len(param_groups(model, 0.05, {"temporal_embeddings": 1.0})) == 2  # no-op scale: no group
    settings = LoopSettings(
        epochs=1,
        batch_size=2,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=0,
        weight_decay=0.05,
        grad_clip=1.0,
        checkpoint_every=10,
        log_every=1,
        seed=0,
        temporal_lr_scale=10.0,
    )
    optimizer, schedule = build_optimizer(model, settings, total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3, 1e-2])
    optimizer.step()
    schedule.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[2] == pytest.approx(10 * lrs[0]) and lrs[0] < 1e-3  # decays with the others


def test_resume_refuses_a_changed_data_plan(tmp_path):
    from pipeline.checkpoints import check_checkpoint_plan
    from pipeline.runtime.stage import StageError

    (tmp_path / "meta.json").write_text(json.dumps({"steps_per_epoch": 3, "total_steps": 6}))
    check_checkpoint_plan(tmp_path, 3, 6)  # the same plan: resumes
    with pytest.raises(StageError, match="3 steps per epoch and 6 steps in all; the data now gives 4 and 8"):
        check_checkpoint_plan(tmp_path, 4, 8)


# ---------------------------------------------------------------------------------------
# Seed-style data plan: every pair, fresh views, global vs per-process batch, iteration budget
# ---------------------------------------------------------------------------------------


def test_each_read_of_a_video_takes_its_next_view():
    """From the cache, a video's reads cycle through its stored views (over epochs too); from video,
    every read draws a view never drawn before, whose first draws are the cached ones."""
    cached = TrainPlan(_records(4, 3), seed=0, captions="all", num_views=3, global_batch=4)
    fresh = TrainPlan(_records(4, 3), seed=0, captions="all", num_views=3, global_batch=4, fresh_views=True)
    for video in ("v0", "v3"):
        seen = [e.view for epoch in range(3) for e in cached.epoch(epoch)[:12] if e.video_id == video]
        assert (
            len(seen) == 9
            and set(seen) == {1, 2}
            and all(a != b for a, b in zip(seen, seen[1:], strict=False))
        )
        drawn = sorted(e.view for epoch in range(3) for e in fresh.epoch(epoch)[:12] if e.video_id == video)
        assert len(set(drawn)) == 9 and drawn[0] in (1, 2)  # 3 epochs x 3 captions: 9 distinct views
    first = [(e.video_id, e.view) for e in cached.epoch(0)[:12]]
    assert [
        (v, 1 + (view - 1) % 2) for v, view in [(e.video_id, e.view) for e in fresh.epoch(0)[:12]]
    ] == first
    assert cached.epoch(2) == TrainPlan(_records(4, 3), 0, "all", 3, 4).epoch(
        2
    )  # a function of (seed, epoch)


def test_global_batch_per_process_batch_and_accumulation():
    from pipeline.config import ConfigError, TrainConfig

    seed_recipe = TrainConfig(batch_size=512, gpu_batch=64)
    assert seed_recipe.accumulation(8) == (64, 1) and seed_recipe.accumulation(2) == (64, 4)
    assert TrainConfig(batch_size=64, grad_accum=2).accumulation(8) == (4, 2)
    with pytest.raises(
        ConfigError, match=r"train.batch_size \(512\) must be train.gpu_batch \(64\) x processes \(3\)"
    ):
        seed_recipe.accumulation(3)
    with pytest.raises(ConfigError, match="set train.gpu_batch or train.grad_accum, not both"):
        TrainConfig(batch_size=512, gpu_batch=64, grad_accum=2)
    with pytest.raises(
        ConfigError, match=r"scst.batch_size \(16\) must be a multiple of scst.gpu_batch \(3\)"
    ):
        from pipeline.config import ScstConfig

        ScstConfig(batch_size=16, gpu_batch=3)


def test_iteration_budget_validates_every_n_steps_and_resumes_mid_round(tiny_world, tmp_path):
    """`max_steps` + `val_every` (LAVIS's inner epochs) cross epoch boundaries (3 steps an epoch here);
    the schedule ends with the budget; a run resumed in the middle of a round ends bit for bit equal."""
    import shutil

    from safetensors.torch import load_file

    import stages.train as train

    sections = {"train": {"max_steps": 7, "val_every": 4, "checkpoint_every": 5, "gpu_batch": 2}}
    config = tiny_config(tiny_world, tmp_path / "a", **sections)
    summary = train.run(config)
    assert summary["steps"] == 7 and summary["steps_per_epoch"] == 3 and summary["epochs"] == 3
    records = [
        json.loads(line) for line in (config.stage_dir("train") / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["epoch"], r["step"]) for r in records if r["kind"] == "epoch"] == [(0, 0), (1, 4), (2, 7)]
    lrs = [r["lr"] for r in records if r["kind"] == "step"]
    assert lrs[0] < 1e-6 and lrs[1:3] == pytest.approx([5e-4, 1e-3])  # 2 warm-up steps from 1e-8, the peak

    again = tiny_config(tiny_world, tmp_path / "b", **sections)
    train.run(again)
    out = again.stage_dir("train")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000007"]
    (out / "DONE.json").unlink()  # as if killed before step 7: resume at step 5, mid-round and mid-epoch
    shutil.rmtree(out / "checkpoints/step_00000007")
    train.run(again)
    assert "resuming from" in (out / "log.txt").read_text()
    a = load_file(str(config.stage_dir("train") / "checkpoints/step_00000007/trainable.safetensors"))
    b = load_file(str(out / "checkpoints/step_00000007/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_checkpoint_by_beam_search_cider_plus_bleu4(tiny_world, tmp_path):
    """`select: beam_cider_bleu4` (LAVIS): validation with eval's beams, best by CIDEr-D + BLEU-4."""
    import stages.train as train

    config = tiny_config(tiny_world, tmp_path, train={"epochs": 1, "select": "beam_cider_bleu4"},
                         eval={"num_beams": 3})  # fmt: skip
    summary = train.run(config)
    out = config.stage_dir("train")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in rounds] == [0, 1] and summary["select"] == "beam_cider_bleu4"
    for r in rounds:
        assert 0 <= r["val_bleu4"] <= 1 and r["val_score"] == pytest.approx(r["val_cider"] + r["val_bleu4"])
    best = json.loads((out / "best/val_score.json").read_text())
    assert best["val_score"] == rounds[1]["val_score"] and best["val_cider"] == summary["best_val_cider"]


def test_lavis_weight_decay_reaches_query_tokens_and_embeddings(tiny_world):
    """`no_decay: [bias, norm]` (the presets, as LAVIS): every >= 2-d weight decays but norms."""
    model = _model(tiny_world, temporal_embeddings=True)
    decay, no_decay = param_groups(model, 0.05, no_decay_names=("bias", "norm"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, skipped = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}
    assert {"blip.query_tokens", "temporal_embeddings"} <= decayed
    assert all(p.ndim >= 2 and "norm" not in names[id(p)].lower() for p in decay["params"])
    assert all(p.ndim < 2 or "norm" in names[id(p)].lower() for p in no_decay["params"]) and skipped
