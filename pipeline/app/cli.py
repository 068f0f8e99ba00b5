"""The `vidcap` command line: thin click commands that build a config and call a stage.

Each command imports what it runs inside its body, on purpose: torch, transformers and the
stages take seconds to import, and `vidcap --help` should not wait for them.

Every stage command takes `--config FILE` and repeated `--set section.key=value`; `--force`
redoes a finished stage. Errors a user can fix (bad config, missing inputs, no Java) are
printed as one message, without a traceback.
"""

from __future__ import annotations

import json

import click

from pipeline.runtime.commandline import cli_config, config_options, print_json, user_errors

# `pipeline.demo.testmodels.PRESETS` (a test keeps them in step; importing it would import torch)
MODEL_PRESETS = (
    "tiny-t5",
    "tiny-opt",
    "vitg-flan-t5-xl",
    "vitg-opt-2.7b",
    "tiny-instructblip",
    "vitg-vicuna-7b",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vidcap")
def main() -> None:
    """vidcap: BLIP-2 as a video captioner, as resumable stages around a feature cache.

    \b
    Typical run:
      vidcap extract --config configs/msrvtt_t5xl_ce.yaml   # ViT tokens -> Zarr cache
      vidcap train   --config configs/msrvtt_t5xl_ce.yaml   # CE from the cache
      vidcap scst    --config configs/msrvtt_t5xl_ce.yaml   # self-critical, CIDEr reward
      vidcap eval    --config configs/msrvtt_t5xl_ce.yaml   # coco-caption metrics
    or all at once: vidcap run --config ... (= python run_pipeline.py).
    """


def _stage_command(name: str, summary: str, retry_failed: bool = False) -> None:
    @main.command(name=name, help=summary)
    @config_options
    @click.option("--force", is_flag=True, help="Redo the stage even if it finished with other settings.")
    @user_errors
    def command(config_path: str | None, overrides: tuple[str, ...], force: bool, **options: bool) -> None:
        from pipeline.runtime.stage import configure_threads
        from run_pipeline import STAGES

        config = cli_config(config_path, overrides)
        configure_threads(config)
        print_json(STAGES[name](config, force=force, **options))

    if retry_failed:
        help_text = "Attempt the videos the cache marks failed again (fix their files first); keep the rest."
        click.option("--retry-failed", is_flag=True, help=help_text)(command)


_stage_command(
    "extract",
    "Decode videos, run the frozen ViT once, store the tokens in the Zarr cache.",
    retry_failed=True,
)
_stage_command("train", "Cross-entropy training from the cache (or raw videos); torchrun for several GPUs.")
_stage_command("scst", "Self-critical sequence training (CIDEr-D reward) from the best CE checkpoint.")
_stage_command(
    "eval", "Caption a split and score it with coco-caption metrics (BLEU, METEOR, ROUGE-L, CIDEr)."
)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False
)
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the stages of one config in order, skipping finished ones (= python run_pipeline.py)."""
    from run_pipeline import main as run_pipeline_main

    run_pipeline_main.main(args=ctx.args, prog_name="vidcap run")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--model", "model_path", required=True, help="Exported model folder, or a base BLIP-2 (hub id / folder)."
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output JSONL (appended; resumable).",
)
@click.option(
    "--retry-errors", is_flag=True, help="Caption again the videos --out holds an error record for."
)
@config_options
@user_errors
def caption(
    inputs: tuple[str, ...],
    model_path: str,
    out_path: str,
    retry_errors: bool,
    config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Caption video files, folders, globs or manifests (JSONL, CSV with a path column, text list).

    Re-running with the same --out skips videos already captioned; unreadable videos get an
    `error` record and never stop the run (--retry-errors tries them again).
    """
    from pipeline.runtime.stage import configure_threads
    from stages.caption import caption_videos

    config = cli_config(config_path, overrides)
    configure_threads(config)
    print_json(caption_videos(list(inputs), model_path, out_path, config, retry_errors=retry_errors))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--merge-lora",
    is_flag=True,
    help="Write a full BLIP-2 folder (LoRA merged into the language model) that needs nothing else.",
)
@user_errors
def export(run_dir: str, out_dir: str, merge_lora: bool) -> None:
    """Write a model folder from a run (best SCST checkpoint, else best CE).

    It holds the trained weights and settings, and names the base BLIP-2 it loads the rest from
    (`pretrained` in video_model.json: a hub id, or a local folder that must stay where it is).
    With --merge-lora it is a full model folder that needs nothing else."""
    from stages.train import export_run

    click.echo(str(export_run(run_dir, out_dir, merge_lora=merge_lora)))


@main.command("init-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--preset",
    default="tiny-t5",
    show_default=True,
    type=click.Choice(MODEL_PRESETS),
    help="Tiny random models for tests and the demo; full-size shapes (random weights) for benchmarks.",
)
@click.option(
    "--vocab-from",
    type=click.Path(exists=True),
    help="Annotations whose words form the tiny tokenizer's vocabulary.",
)
@click.option("--seed", default=0, show_default=True, help="Initialisation seed.")
@user_errors
def init_model(out_dir: str, preset: str, vocab_from: str | None, seed: int) -> None:
    """Write a randomly initialised BLIP-2 or InstructBLIP as an ordinary Hugging Face folder (tests, demo, benchmarks)."""
    from pipeline.demo.testmodels import init_model as build

    click.echo(str(build(out_dir, preset, vocab_from=vocab_from, seed=seed)))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--videos", default=120, show_default=True, type=click.IntRange(min=1), help="Number of videos."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the world.")
@user_errors
def synth(out_dir: str, videos: int, seed: int) -> None:
    """Write the synthetic world: real encoded videos, splits, several captions per video."""
    from pipeline.demo.synth import make_synthetic_world

    print_json(make_synthetic_world(out_dir, num_videos=videos, seed=seed))


@main.command()
@click.argument("gts", type=click.Path(exists=True, dir_okay=False))
@click.argument("res", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--impl",
    type=click.Choice(["coco", "fast"]),
    default="coco",
    show_default=True,
    help="coco: pycocoevalcap (all metrics); fast: our CIDEr-D only.",
)
@user_errors
def score(gts: str, res: str, impl: str) -> None:
    """Score captions RES (JSON list of {image_id|video_id, caption}) against GTS (COCO ground truth or manifest)."""
    from pipeline.metrics import score_files

    click.echo(json.dumps(score_files(gts, res, impl=impl)))


@main.group()
def cache() -> None:
    """Inspect feature caches."""


@cache.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (videos, done, failed, fingerprint, bytes)."
)
@click.option("--verify", is_flag=True, help="Check every chunk of every done video against its checksum.")
@click.option(
    "--repair", is_flag=True, help="With --verify: mark damaged videos pending, so extract redoes them."
)
@user_errors
def cache_info(path: str, as_json: bool, verify: bool, repair: bool) -> None:
    """What a cache holds: videos done and failed (with reasons), fingerprint, size on disk.

    With --verify, every chunk of every done video is checked (size and CRC-32); the exit
    status is 1 when any is missing or damaged.
    """
    from cache.store import FeatureStore

    store = FeatureStore.open(path, mode="r+" if repair else "r")
    info = store.info()
    if verify or repair:
        info["verify"] = store.verify(repair=repair)
    if as_json:
        print_json(info)
    else:
        _print_cache_info(path, info)
    if info.get("verify", {}).get("damaged"):
        raise SystemExit(1)


def _print_cache_info(path: str, info: dict) -> None:
    failed = info.get("failed", {})
    click.echo(
        f"{path}: {info['done']}/{info['videos']} videos done, {len(failed)} failed, "
        f"{info['bytes'] / 1e6:.1f} MB"
    )
    for key, value in info.get("fingerprint", {}).items():
        click.echo(f"  {key}: {value}")
    for video_id, reason in list(failed.items())[:20]:
        click.echo(f"  failed {video_id}: {reason}")
    if "verify" in info:
        checked = info["verify"]
        click.echo(f"verified {checked['checked']} done videos: {len(checked['damaged'])} damaged")
        for reason in list(checked["damaged"].values())[:20]:
            click.echo(f"  {reason}")
        if checked["repaired"]:
            click.echo("  damaged videos are pending again: run extract to redo them")


@main.command("config-reference")
def config_reference() -> None:
    """Print every config key with its default and meaning (Markdown)."""
    from pipeline.config import config_reference as reference

    click.echo(reference())


@main.command("show-config")
@config_options
@user_errors
def show_config(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved config (defaults + file + overrides) after validation."""
    import yaml

    click.echo(yaml.safe_dump(cli_config(config_path, overrides).to_dict(), sort_keys=False))


@main.command()
@config_options
@click.option("--gpus", default=8, show_default=True, help="Processes the stages will run on (torchrun's).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON, for scripts.")
@user_errors
def plan(config_path: str | None, overrides: tuple[str, ...], gpus: int, as_json: bool) -> None:
    """Print each training stage's effective recipe (examples, steps, batch split, LR, frames, precision,
    trainable parameters, generation) before anything runs."""
    from pipeline.plan import format_plan, plan_config

    config = cli_config(config_path, overrides)
    plans = plan_config(config, gpus)
    if as_json:
        print_json({"config": config.source, "gpus": gpus, "stages": [p.to_dict() for p in plans]})
    else:
        click.echo(format_plan(plans, config.source), nl=False)


@main.command()
@config_options
@click.option(
    "--qformer-epochs",
    default=0,
    show_default=True,
    help="Also train the model's fusion + Q-Former with a linear head on `direction` (0: skip).",
)
@user_errors
def probe(config_path: str | None, overrides: tuple[str, ...], qformer_epochs: int) -> None:
    """Linear probes of the synthetic world's facts on a config's cached tokens (no video decoded)."""
    from pipeline.demo.probe import format_probe_table, probe_cache, qformer_probe, true_facts_and_splits

    config = cli_config(config_path, overrides)
    facts, splits = true_facts_and_splits(config)
    click.echo(format_probe_table({config.cache_path.stem: probe_cache(config.cache_path, facts, splits)}))
    if qformer_epochs > 0:
        accuracy = qformer_probe(config, "direction", qformer_epochs)
        click.echo(
            f"direction from the model's fusion + Q-Former with a linear head, {qformer_epochs} epochs: "
            f"{100 * accuracy:.1f} (val split)"
        )


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False
)
@click.pass_context
def ablate(ctx: click.Context) -> None:
    """Train the variants of an ablation file from one shared feature cache and print one table."""
    from pipeline.app.ablate import ablate as ablate_command

    ablate_command.main(args=ctx.args, prog_name="vidcap ablate")


if __name__ == "__main__":
    main()
