"""Benchmark: pseudo-labelling in miniature, and whether the mixture's data path keeps up.

    python benchmarks/bench_pseudo.py --table        # the README's table (about 15 min on 2 cores)
    python benchmarks/bench_pseudo.py --loader       # mixture vs single-set loader, examples/s
    python benchmarks/bench_pseudo.py --loader --shape paper --videos 48   # ViT-g-sized tokens
    python benchmarks/bench_pseudo.py --plan         # building a mixture's epoch over a 1M-video set
    python benchmarks/bench_pseudo.py --confidence   # what the confidence fields cost the caption stage

`--table` runs the loop's first stages of `configs/demo_pseudo.yaml` (extract, train_labelled,
pseudo_caption, extract_sets), then every variant of `configs/ablations_pseudo.yaml` (`vidcap
ablate`: CE on the labelled videos alone vs labelled + pseudo-labelled at 1:1, 1:3, 1:7, with all
pseudo-labels or the confident half), and prints how right the pseudo-labels are (the facts they
state against the synthetic world's), all of them and the kept half, with the caption stage's rate.

`--loader` writes two feature stores of random float16 tokens and times the training data loader
(`pipeline.data.make_loader`, what `fit` iterates) over one store (a `TrainPlan`) and over both
at 1:3 (a `MixturePlan` routing set-prefixed ids to each store), with 0 and 2 worker processes; the best
of three runs (other processes share the CPUs).
On a GPU machine, run it where the caches live: the loader is CPU and disk work either way.

`--confidence` times captioning from frame tokens with plain beam search and with
`captions_with_confidence` (all k beams returned, the chosen caption re-scored teacher-forced).

`--plan` times what the mixture adds per epoch in the training process: `MixturePlan.epoch` over a
10k-video labelled set and a 1M-video pseudo set at 1:7 (batch 64), pure Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"tiny": (8, 17, 64), "paper": (8, 257, 1408)}  # (T, L, D): the demo's tiny ViT, EVA ViT-g


# ---------------------------------------------------------------------------------------
# --table
# ---------------------------------------------------------------------------------------


def table() -> None:
    from pipeline.app.ablate import run_ablations
    from pipeline.config import load_config
    from run_pipeline import run_pipeline

    config = load_config(ROOT / "configs" / "demo_pseudo.yaml")
    run_pipeline(config, stages=["extract", "train_labelled", "pseudo_caption", "extract_sets"])
    run_ablations(ROOT / "configs" / "ablations_pseudo.yaml")
    print(pseudo_label_quality(config), file=sys.stderr)


def pseudo_label_quality(config) -> str:
    """How often the pool's pseudo-labels state each fact right: all of them, and the filtered set."""
    from pipeline.annotations import read_captions_jsonl
    from pipeline.demo.facts import order_word_accuracy, true_facts
    from pipeline.runtime.stage import read_done

    facts = true_facts(config)
    pseudo = next(s for s in config.data.train_sets if s.pool)
    path = Path(pseudo.annotations)
    rows = [
        "",
        f"{'pseudo-labels':<28}{'videos':>8}{'direction':>11}{'axis':>8}{'colour':>8}{'shape':>8}{'all 4':>8}",
    ]
    for name, kept in (
        ("all", read_captions_jsonl(path)),
        ("confident half", read_captions_jsonl(path, top_fraction=0.5)),
        ("least confident half", _complement(path)),
    ):
        predictions = [{"video_id": r.video_id, "caption": r.captions[0]} for r in kept]
        acc = order_word_accuracy(predictions, facts)
        every = _all_right(predictions, facts)
        cells = "".join(f"{100 * acc[k]:>{w}.1f}" for k, w in (("direction_acc", 11), ("axis_acc", 8),
                                                              ("color_acc", 8), ("shape_acc", 8)))  # fmt: skip
        rows.append(f"{name:<28}{len(predictions):>8}{cells}{100 * every:>8.1f}")
    summary = (read_done(config, "pseudo_caption") or {}).get("summary", {})
    rows.append(
        f"(caption stage: {summary.get('captioned')} videos in {summary.get('seconds')} s, "
        f"{summary.get('videos_per_s')} videos/s on {summary.get('mode')}; beams {config.caption.num_beams})"
    )
    return "\n".join(rows)


def _complement(path: Path) -> list:
    from pipeline.annotations import read_captions_jsonl

    top = {r.video_id for r in read_captions_jsonl(path, top_fraction=0.5)}
    return [r for r in read_captions_jsonl(path) if r.video_id not in top]


def _all_right(predictions: list[dict], facts: dict) -> float:
    from pipeline.demo.synth import parse_facts

    scored = [
        (parse_facts(p["caption"]), facts[p["video_id"]]) for p in predictions if p["video_id"] in facts
    ]
    return sum(all(said[k] == truth[k] for k in truth) for said, truth in scored) / max(1, len(scored))


# ---------------------------------------------------------------------------------------
# --loader
# ---------------------------------------------------------------------------------------


def _store(path: Path, prefix: str, videos: int, shape: tuple[int, int, int], seed: int):
    from cache.store import FeatureStore

    ids = [f"{prefix}{i:05d}" for i in range(videos)]
    store = FeatureStore.create(path, ids, 1, *shape, fingerprint={"bench": prefix})
    rng = np.random.default_rng(seed)
    for video_id in ids:
        store.write_video(video_id, rng.standard_normal((1, *shape), dtype=np.float32).astype(np.float16))
    return store, ids


def _records(ids: list[str]):
    from pipeline.annotations import VideoRecord

    return [VideoRecord(v, f"/none/{v}.mp4", "train", (f"a caption of {v}",)) for v in ids]


def _examples_per_s(plan, source, batches: int, workers: int) -> float:
    from pipeline.data import Sharding, make_loader

    seen, started, epoch = 0, None, 0
    while seen < batches + 2:
        for batch in make_loader(plan, source, epoch, Sharding(plan.global_batch), 0, workers, False):
            if seen == 2:  # after the workers started
                started, examples = time.perf_counter(), 0
            if seen >= 2:
                examples += len(batch["video_ids"])
            seen += 1
            if seen >= batches + 2:
                break
        epoch += 1
    return examples / (time.perf_counter() - started)


def loader(shape_name: str, videos: int, batch: int, batches: int, worker_counts: list[int]) -> None:
    from pipeline.data import CacheSource, TrainPlan
    from pipeline.mixture import MixturePlan, MixtureSource

    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory() as tmp:
        a, a_ids = _store(Path(tmp) / "labelled.zarr", "a", videos, shape, 0)
        b, b_ids = _store(Path(tmp) / "pseudo.zarr", "b", videos, shape, 1)
        single = TrainPlan(_records(a_ids), 0, global_batch=batch)
        labelled, pseudo = CacheSource(a), CacheSource(b)
        mixture = MixturePlan(
            ["labelled", "pseudo"], [1, 3], [single, TrainPlan(_records(b_ids), 1, global_batch=batch)], 0
        )
        source = MixtureSource({"labelled": labelled, "pseudo": pseudo}, labelled)
        mb = np.prod(shape) * 2 / 1e6
        print(f"\ntraining data loader, CPU: {videos} videos per store, tokens {shape} float16 "
              f"({mb:.2f} MB per video), batch {batch}, {batches} batches timed")  # fmt: skip
        print(f"{'plan':<26}{'workers':>8}{'examples/s':>12}{'MB/s':>9}")
        for workers in worker_counts:
            for name, plan, src in (
                ("single set", single, labelled),
                ("mixture 1:3 (2 stores)", mixture, source),
            ):
                rate = max(
                    _examples_per_s(plan, src, batches, workers) for _ in range(3)
                )  # best of 3: shared CPUs
                print(f"{name:<26}{workers:>8}{rate:>12.1f}{rate * mb:>9.1f}")


# ---------------------------------------------------------------------------------------
# --confidence
# ---------------------------------------------------------------------------------------


def confidence_cost(batch: int, beams: int, repeats: int) -> None:
    """Captioning from frame tokens: plain beam search vs `captions_with_confidence` (beams + re-score)."""
    import torch

    from pipeline.confidence import captions_with_confidence
    from pipeline.config import ModelConfig
    from pipeline.demo.synth import SYNTH_VOCAB
    from pipeline.demo.testmodels import init_model
    from pipeline.model import VideoCaptioner

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.jsonl"
        vocab.write_text(
            json.dumps({"video_id": "v", "split": "train", "captions": [" ".join(SYNTH_VOCAB)]}) + "\n"
        )
        folder = init_model(Path(tmp) / "tiny", "tiny-t5", vocab_from=vocab, seed=0)
        model = VideoCaptioner.from_pretrained(
            folder, ModelConfig(pretrained=str(folder), num_frames=8, image_size=32)
        )
        model.eval()
        tokens = torch.randn(batch, 8, model.tokens_per_frame, model.vision_width)  # (B, T, L, D)
        lengths = dict(max_new_tokens=32, min_new_tokens=5)
        timings = {}
        for name, call in (
            ("beam search", lambda: model.generate(tokens, num_beams=beams, **lengths)),
            ("+ confidence", lambda: captions_with_confidence(model, tokens, beams, **lengths)),
        ):
            call()  # warm-up
            started = time.perf_counter()
            for _ in range(repeats):
                call()
            timings[name] = (time.perf_counter() - started) / repeats
    base = timings["beam search"]
    print(f"\ncaptioning {batch} videos from frame tokens, tiny T5, {beams} beams, CPU, {repeats} calls")
    for name, seconds in timings.items():
        print(
            f"  {name:<14}{batch / seconds:>9.1f} videos/s  ({seconds / base:.2f}x the time of beam search)"
        )


# ---------------------------------------------------------------------------------------
# --plan
# ---------------------------------------------------------------------------------------


def plan_cost(labelled: int, pseudo: int, batch: int) -> None:
    from pipeline.data import TrainPlan
    from pipeline.mixture import MixturePlan

    started = time.perf_counter()
    plans = [
        TrainPlan(_records([f"l{i}" for i in range(labelled)]), 0, global_batch=batch),
        TrainPlan(_records([f"p{i}" for i in range(pseudo)]), 1, global_batch=batch),
    ]
    built = time.perf_counter() - started
    mixture = MixturePlan(["labelled", "pseudo"], [1, 7], plans, 0)
    timings = []
    for epoch in range(3):
        started = time.perf_counter()
        mixture.epoch(epoch)
        timings.append(time.perf_counter() - started)
    print(f"\nmixture plan, {labelled} labelled + {pseudo} pseudo-labelled videos at 1:7, batch {batch}: "
          f"{mixture.steps_per_epoch} steps per epoch")  # fmt: skip
    print(f"  building the two TrainPlans: {built:.2f} s (once per stage start)")
    print("  MixturePlan.epoch (once per epoch per process): " + ", ".join(f"{t:.2f} s" for t in timings))
    print(json.dumps({"steps_per_epoch": mixture.steps_per_epoch, "epoch_s": [round(t, 3) for t in timings]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="the miniature table (real training runs)")
    parser.add_argument("--loader", action="store_true", help="mixture vs single-set loader rates")
    parser.add_argument("--plan", action="store_true", help="cost of a mixture's epoch plan at 1M videos")
    parser.add_argument("--confidence", action="store_true", help="cost of the caption confidence fields")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="token shape for --loader")
    parser.add_argument("--videos", type=int, default=256, help="videos per store for --loader")
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per loader measurement")
    parser.add_argument("--workers", default="0,2", help="loader worker processes to try, comma-separated")
    parser.add_argument(
        "--plan-videos", type=int, default=1_000_000, help="pseudo-labelled videos for --plan"
    )
    args = parser.parse_args(argv)
    if not (args.table or args.loader or args.plan or args.confidence):
        parser.error("choose --table, --loader, --plan and/or --confidence")
    if args.confidence:
        confidence_cost(16, 3, 10)
    if args.loader:
        loader(args.shape, args.videos, args.batch, args.batches, [int(w) for w in args.workers.split(",")])
    if args.plan:
        plan_cost(max(1, args.plan_videos // 100), args.plan_videos, 64)
    if args.table:
        table()


if __name__ == "__main__":
    main()
