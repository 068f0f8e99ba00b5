"""Run the stages of one config in order: extract -> train -> scst -> eval.

    python run_pipeline.py --config configs/demo.yaml
    python run_pipeline.py --config configs/msrvtt_t5xl_ce.yaml --stages extract,train --set train.epochs=3
    torchrun --nproc_per_node 8 run_pipeline.py --config configs/msrvtt_t5xl_scst.yaml --stages train,scst

A stage whose `DONE.json` fingerprint matches the config is skipped; a stage that was cut
off resumes from its own checkpoints; a finished stage whose settings changed is refused
unless named in `--force`. At the end, `<run.output_dir>/summary.json` records what ran,
how long each stage took and the evaluation metrics of every evaluated model.

The pseudo-labelling loop (`configs/demo_pseudo.yaml`) runs stages twice, as named instances on
a derived config, each in its own folder with its own DONE.json: `train_labelled` (`train` on the
labelled data alone), `pseudo_caption` (`caption` of an unlabelled pool with that model),
`extract_sets` (`extract` of each extra training set into its own store); `train` then trains on
the mixture `data.train_sets` names.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.config import Config, ConfigError
from pipeline.demo.qademo import caption_demo_config, prepare_qa_demo
from pipeline.demo.synth import make_synthetic_world
from pipeline.demo.testmodels import init_model
from pipeline.demo.tinypretrain import PRETRAIN_FILE, pretrain_tiny_model
from pipeline.mixture import pseudo_caption_config, set_extract_configs, teacher_config
from pipeline.runtime.commandline import cli_config, config_options, user_errors
from pipeline.runtime.files import atomic_write_json
from pipeline.runtime.stage import configure_threads, read_done
from stages import caption, extract, scst, train
from stages import eval as eval_stage


# Named instances: a stage run again on a derived config (`pipeline/mixture.py`), in its own folder
# `<run>/<instance>/` with its own DONE.json, for the pseudo-labelling loop (README, Pseudo-labelling).
def train_labelled(config: Config, force: bool = False) -> dict[str, Any]:
    """`train` on the labelled data alone (the teacher), ignoring `data.train_sets`."""
    return train.run(teacher_config(config), force=force)


def pseudo_caption(config: Config, force: bool = False) -> dict[str, Any]:
    """`caption` of the pooled train set's videos with the `train_labelled` model, into its annotations."""
    derived = pseudo_caption_config(config)
    if force:  # the pseudo-labels were the previous teacher's: a resume would keep them
        out = Path(derived.caption.out)
        out.unlink(missing_ok=True)
        shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    return caption.run(derived, force=force)


def extract_sets(config: Config, force: bool = False) -> dict[str, Any]:
    """`extract` of every train set with its own annotations into its own store (resumable per set)."""
    return {name: extract.run(derived, force=force) for name, derived in set_extract_configs(config)}


# The stages, in the order a pipeline runs them (their names are also `pipeline.config.STAGES`
# and `STAGE_INSTANCES`).
STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "extract": extract.run,
    "train": train.run,
    "scst": scst.run,
    "eval": eval_stage.run,
    "caption": caption.run,
    "train_labelled": train_labelled,
    "pseudo_caption": pseudo_caption,
    "extract_sets": extract_sets,
}
# Only the training stages run data-parallel; the others shard work through Dask instead.
DISTRIBUTED_STAGES = ("train", "scst", "train_labelled")
METRIC_COLUMNS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def run_pipeline(
    config: Config, stages: list[str] | None = None, from_stage: str = "", force: list[str] | None = None
) -> dict[str, Any]:
    """Run the selected stages of `config` in order and write `summary.json`; returns it."""
    order = _select_stages(config, stages or [], from_stage)
    force = force or []
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    master = int(os.environ.get("RANK", "0")) == 0
    if world_size > 1 and set(order) - set(DISTRIBUTED_STAGES):
        raise ConfigError(
            f"under torchrun only {', '.join(DISTRIBUTED_STAGES)} run data-parallel; "
            f"run {', '.join(s for s in order if s not in DISTRIBUTED_STAGES)} without torchrun "
            "or pass --stages train,scst"
        )
    configure_threads(config)
    if config.run.prepare == "demo" and master:
        prepare_demo(config)

    ran: dict[str, Any] = {}
    for name in order:
        previous = read_done(config, name)
        started = time.time()
        summary = STAGES[name](config, force=name in force or "all" in force)
        # A stage that did nothing leaves its DONE.json as it was (eval, for one, may redo
        # only the models whose checkpoints changed, under an unchanged fingerprint).
        skipped = previous is not None and read_done(config, name) == previous
        ran[name] = {
            "status": "skipped" if skipped else "ran",
            "seconds": round(time.time() - started, 2),
            "summary": summary,
        }

    result = {
        "config": config.source,
        "output_dir": str(config.output_dir),
        "stages": ran,
        "metrics": collect_metrics(config),
    }
    if master:
        atomic_write_json(config.output_dir / "summary.json", result)
        print(format_summary(result), file=sys.stderr)
    return result


def _select_stages(config: Config, stages: list[str], from_stage: str) -> list[str]:
    order = list(stages or config.run.stages)
    for name in order + ([from_stage] if from_stage else []):
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    if from_stage:
        if from_stage not in order:
            raise ConfigError(f"--from {from_stage}: not among the stages to run ({', '.join(order)})")
        order = order[order.index(from_stage) :]
    return order


def collect_metrics(config: Config) -> dict[str, dict[str, float]]:
    """Metrics of every model the eval stage scored: {"zero_shot": {...}, "ce": {...}, "scst": {...}}."""
    metrics: dict[str, dict[str, float]] = {}
    eval_dir = config.stage_dir("eval")
    paths = eval_dir.glob("*/metrics.json") if eval_dir.exists() else []
    listed = {name: i for i, name in enumerate(config.eval.models)}  # the config's order first
    for path in sorted(paths, key=lambda p: (listed.get(p.parent.name, len(listed)), p.parent.name)):
        scores = json.loads(path.read_text())
        metrics[path.parent.name] = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    return metrics


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"run: {result['output_dir']}"]
    for name, info in result["stages"].items():
        lines.append(f"  {name:<8} {info['status']:<8} {info['seconds']:>8.1f} s")
    if result["metrics"]:
        qa = any("accuracy" in values for values in result["metrics"].values())  # data.task: qa
        columns = ("accuracy",) if qa else METRIC_COLUMNS
        lines.append("")
        lines.append(f"  {'model':<12}" + "".join(f"{c:>10}" for c in columns))
        for model, values in result["metrics"].items():
            cells = "".join(f"{100 * values[c]:>10.1f}" if c in values else f"{'-':>10}" for c in columns)
            lines.append(f"  {model:<12}{cells}")
        lines.append("  (scores x 100, as papers report them)")
    return "\n".join(lines)


def prepare_demo(config: Config) -> None:
    """Build the demo's synthetic world and tiny model where the config expects them, if missing."""
    if config.data.task == "qa":  # the captioning demo's world and model first, then its questions
        prepare_demo(caption_demo_config(config))
        prepare_qa_demo(config)
        return
    annotations = Path(config.data.annotations)
    world_summary = annotations.parent / "summary.json"  # written last: the world is complete
    if not world_summary.exists():
        print(f"demo: writing the synthetic world to {annotations.parent}", file=sys.stderr)
        make_synthetic_world(
            annotations.parent,
            num_videos=config.run.demo_videos,
            seed=config.run.seed,
            unlabelled=config.run.demo_unlabelled,
        )
    world = json.loads(world_summary.read_text())
    have = world.get("num_videos")
    if have != config.run.demo_videos:
        raise ConfigError(
            f"run.demo_videos: {config.run.demo_videos}, but the synthetic world in {annotations.parent} "
            f"has {have} videos; delete that folder to rebuild it, or set run.demo_videos={have}"
        )
    if world.get("unlabelled", 0.0) != config.run.demo_unlabelled:
        raise ConfigError(
            f"run.demo_unlabelled: {config.run.demo_unlabelled}, but the synthetic world in "
            f"{annotations.parent} leaves {world.get('unlabelled', 0.0)} of its training videos unlabelled; "
            "delete that folder to rebuild it, or use another data.annotations folder"
        )
    model_dir = Path(config.model.pretrained)
    if not (model_dir / PRETRAIN_FILE).exists():  # written last: the model is complete
        preset = "tiny-opt" if "opt" in model_dir.name else "tiny-t5"
        print(
            f"demo: writing a tiny random {preset} BLIP-2 to {model_dir} and pretraining it "
            "on single synthetic frames (as BLIP-2 was pretrained on images)",
            file=sys.stderr,
        )
        init_model(model_dir, preset, vocab_from=annotations, seed=config.run.seed)
        pretrain_tiny_model(model_dir, image_size=config.model.image_size, seed=config.run.seed)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.option("--stages", default="", help="Comma-separated stages to run (default: run.stages).")
@click.option("--from", "from_stage", default="", help="Start at this stage, skipping the ones before.")
@click.option("--force", "force", multiple=True, metavar="STAGE", help="Redo this stage (repeatable; 'all').")
@user_errors
def main(
    config_path: str | None, overrides: tuple[str, ...], stages: str, from_stage: str, force: tuple[str, ...]
) -> None:
    """Run the stages of one config in order, skipping finished ones and resuming cut ones."""
    config = cli_config(config_path, overrides)
    run_pipeline(config, stages=[s for s in stages.split(",") if s], from_stage=from_stage, force=list(force))


if __name__ == "__main__":
    main()
