"""Ablations in miniature: train many variants of one config from one extraction.

    vidcap ablate configs/ablations_demo.yaml
    vidcap ablate configs/ablations_demo.yaml --only mean --only concat --set train.epochs=5
    python -m pipeline.app.ablate configs/ablations_demo.yaml          # the same, without the CLI

An ablation file names a base pipeline config, overrides for every variant, and the variants:

    base: demo.yaml                   # relative to this file's folder, else to the working directory
    output_dir: runs/ablations_demo   # variant `mean` runs in runs/ablations_demo/mean/
    set: [train.epochs=10]            # `section.key=value` overrides for every variant
    variants:
      mean: [model.fusion=mean]       # short form: overrides; its row is the CE model
      concat+temporal:
        set: [model.temporal_embeddings=true]
        rows: {zero_shot: zero-shot, ce: concat+temporal, scst: concat+temporal + SCST}

`rows` maps the models a variant evaluates (`zero_shot`, `ce`, `scst`) to their row in the
table; the stages follow from it (`scst` adds the scst stage, `ce` or `scst` the train stage).
Each variant is an ordinary `run_pipeline` run in its own folder, so a killed ablation resumes
where it stopped, finished variants are skipped, and a variant whose settings changed is refused
(as `vidcap run` would) unless forced.

Why it is cheap: variants whose extraction settings agree (the extract stage's fingerprint
settings apart from `cache.path`) share one Zarr store, `<output_dir>/cache/<T>f-<hash>.zarr`,
unless the variant sets `cache.path` itself. The first such variant decodes the videos and runs
the ViT; the extract stage of the others finds every video done in the store (its summary says
`done: 0, skipped: N`) and training reads the same tokens. Changing `model.num_frames` changes
the tokens, so it gets a store of its own.

Each row reports test CIDEr (`eval/<model>/metrics.json`) and, where the annotations carry the
synthetic world's facts (`pipeline.demo.synth`), the accuracy of the facts the captions state:
direction (needs frame order), axis (horizontal or vertical: visible in any one frame), colour and
shape. The table is printed and written, with everything else per row, to `<output_dir>/ablations.json`.
Under it, `pipeline.demo.probe`'s linear probes of each shared cache say which facts the tokens carry
at all (in frame order and averaged over frames), whatever the captioner learned from them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import Config, ConfigError, load_config, stage_settings
from pipeline.demo.facts import order_word_accuracy, true_facts
from pipeline.demo.probe import format_probe_table, probe_ablation_caches
from pipeline.runtime.commandline import user_errors
from pipeline.runtime.files import atomic_write_json
from pipeline.runtime.stage import current_fingerprint, read_done

RESULTS_FILE = "ablations.json"
REPORTABLE_MODELS = ("zero_shot", "ce", "scst")
_FILE_KEYS = ("base", "output_dir", "set", "variants")
_VARIANT_KEYS = ("set", "rows")


@dataclass
class Variant:
    """One pipeline run of the ablation and the table rows it contributes."""

    name: str
    config: Config
    """Validated: base + the file's `set` + the variant's `set` + output folder, stages, models, cache."""
    rows: dict[str, str]
    """Evaluated model (`zero_shot`, `ce`, `scst`) -> its row label in the table."""


@dataclass
class Ablation:
    path: Path
    output_dir: Path
    variants: dict[str, Variant] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Loading: every variant becomes an ordinary, validated pipeline config
# ---------------------------------------------------------------------------------------


def is_ablation_file(path: str | Path) -> bool:
    """Whether a YAML file is an ablation (top-level `variants:`) rather than a pipeline config."""
    raw = yaml.safe_load(Path(path).read_text())
    return isinstance(raw, dict) and "variants" in raw


def load_ablation(
    path: str | Path, overrides: Sequence[str] = (), output_dir: str | Path | None = None
) -> Ablation:
    """Read an ablation file and validate every variant as a pipeline config.

    A variant's config is the base, then the file's `set`, then the variant's `set`, then `overrides`
    (the command line's `--set`), then its output folder, stages, models and shared cache.
    """
    path = Path(path)
    raw = _read_mapping(path)
    unknown = sorted(set(raw) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; an ablation file has {', '.join(_FILE_KEYS)}")
    for key in ("base", "variants"):
        if not raw.get(key):
            raise ConfigError(f"{path}: `{key}` is missing")
    if not isinstance(raw["variants"], dict):
        raise ConfigError(f"{path}: `variants` must map names to overrides")
    base = _resolve_base(path, str(raw["base"]))
    out = Path(output_dir or raw.get("output_dir") or f"runs/{path.stem}")
    common = _overrides(raw.get("set"), f"{path}: set")
    ablation = Ablation(path, out)
    folders: dict[str, str] = {}
    for name, spec in raw["variants"].items():
        name = str(name)
        folder = _folder_name(name)
        if folder in folders:
            raise ConfigError(f"{path}: variants {folders[folder]!r} and {name!r} would share {out / folder}")
        folders[folder] = name
        ablation.variants[name] = _load_variant(path, base, out, name, folder, spec, common, list(overrides))
    return ablation


def _load_variant(
    path: Path, base: Path, out: Path, name: str, folder: str, spec: Any, common: list[str], last: list[str]
) -> Variant:
    where = f"{path}: variant {name!r}"
    if spec is None or isinstance(spec, (list, str)):
        spec = {"set": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected a list of overrides or a mapping with {', '.join(_VARIANT_KEYS)}"
        )
    unknown = sorted(set(spec) - set(_VARIANT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a variant has {', '.join(_VARIANT_KEYS)}")
    rows = {str(k): str(v) for k, v in (spec.get("rows") or {"ce": name}).items()}
    bad = sorted(set(rows) - set(REPORTABLE_MODELS))
    if bad:
        raise ConfigError(f"{where}: rows: {bad[0]!r} is not one of {', '.join(REPORTABLE_MODELS)}")
    models = [m for m in REPORTABLE_MODELS if m in rows]
    stages = [
        "extract",
        *(["train"] if {"ce", "scst"} & set(rows) else []),
        *(["scst"] if "scst" in rows else []),
    ]
    own = [*common, *_overrides(spec.get("set"), where), *last]
    ours = [
        f"run.output_dir={json.dumps(str(out / folder))}",  # JSON: YAML would read `on`, `1e3`, ... as non-strings
        f"run.stages={json.dumps([*stages, 'eval'])}",
        f"eval.models={json.dumps(models)}",
    ]
    try:
        config = load_config(base, [*own, *ours])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not config.cache.path:  # share the store with every variant that would extract the same tokens
        cache = json.dumps(str(shared_cache_path(config, out)))
        config = load_config(base, [*own, *ours, f"cache.path={cache}"])
    return Variant(name, config, rows)


def shared_cache_path(config: Config, output_dir: Path) -> Path:
    """`<output_dir>/cache/<T>f-<hash>.zarr`, the hash of every extract setting but the store's path."""
    settings = {k: v for k, v in stage_settings(config, "extract").items() if k != "cache.path"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return output_dir / "cache" / f"{config.model.num_frames}f-{digest}.zarr"


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read ablation file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base, output_dir, set, variants)")
    return raw


def _resolve_base(path: Path, base: str) -> Path:
    candidate = Path(base)
    if candidate.is_absolute() or not (path.parent / candidate).exists():
        return candidate  # relative to the working directory (as the configs' own data paths are)
    return path.parent / candidate


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and "=" in v for v in items):
        raise ConfigError(f"{where}: expected a list of section.key=value overrides, got {value!r}")
    return list(items)


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "variant"


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def run_ablations(
    path: str | Path,
    variants: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    force: Sequence[str] = (),
    output_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run the variants (all, or those named) in file order; print the table; return its rows.

    The rows of every variant that has results, run now or before, go to `<output_dir>/ablations.json`
    after each variant, so a table survives an interrupted ablation.
    """
    from run_pipeline import run_pipeline

    ablation = load_ablation(path, overrides, output_dir)
    unknown = [v for v in variants or () if v not in ablation.variants]
    if unknown:
        raise ConfigError(f"{path}: no variant {unknown[0]!r}; variants are {', '.join(ablation.variants)}")
    selected = [v for v in ablation.variants.values() if not variants or v.name in variants]
    extracted: set[Path] = set()
    for variant in selected:
        print(f"ablation: variant {variant.name!r} in {variant.config.output_dir}", file=sys.stderr)
        run_pipeline(variant.config, force=_forced_stages(force, variant.config.cache_path in extracted))
        extracted.add(variant.config.cache_path)
        _write_results(ablation, collect_rows(ablation))
    rows = [r for r in collect_rows(ablation) if r["variant"] in {v.name for v in selected}]
    print(format_ablation_table(rows), file=sys.stderr)
    probes = probe_ablation_caches([v.config for v in selected])
    if probes:
        print(format_probe_table(probes), file=sys.stderr)
        _write_results(ablation, collect_rows(ablation), probes)
    return rows


def _forced_stages(force: Sequence[str], cache_redone: bool) -> list[str]:
    """`force` for one variant: a forced extraction rebuilds a shared store once, not once per variant."""
    if not cache_redone:
        return list(force)
    stages = ["train", "scst", "eval"] if "all" in force else [s for s in force if s != "extract"]
    return [s for s in stages if s != "all"]


def collect_rows(ablation: Ablation) -> list[dict[str, Any]]:
    """The table rows of every variant whose evaluation finished, in file order."""
    rows = []
    for variant in ablation.variants.values():
        rows.extend(variant_rows(variant))
    return rows


def variant_rows(variant: Variant) -> list[dict[str, Any]]:
    """One row per model of the variant that `eval` has scored with the variant's current settings
    (none before its eval ran, or when the file changed since: results of other settings are no rows)."""

    config = variant.config
    if (read_done(config, "eval") or {}).get("fingerprint") != current_fingerprint(config, "eval"):
        return []
    facts = true_facts(config)
    extract = (read_done(config, "extract") or {}).get("summary", {})
    seconds = {
        stage: (read_done(config, stage) or {}).get("summary", {}).get("seconds")
        for stage in ("train", "scst")
    }
    rows = []
    for model, label in variant.rows.items():
        folder = config.stage_dir("eval") / model
        metrics, predictions = _read_json(folder / "metrics.json"), _read_json(folder / "predictions.json")
        if metrics is None or predictions is None:
            continue
        row: dict[str, Any] = {
            "row": label,
            "variant": variant.name,
            "model": model,
            "output_dir": str(config.output_dir),
            "cache": str(config.cache_path),
            "CIDEr": metrics.get("CIDEr"),
            "num_videos": metrics.get("num_videos"),
            **order_word_accuracy(predictions, facts),
            "train_s": _train_seconds(model, seconds),
            "extract": {k: extract.get(k) for k in ("videos", "done", "skipped", "failed", "seconds")},
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        rows.append(row)
    return rows


def _train_seconds(model: str, seconds: Mapping[str, float | None]) -> float | None:
    if model == "ce":
        return seconds["train"]
    if model == "scst" and seconds["train"] is not None and seconds["scst"] is not None:
        return round(seconds["train"] + seconds["scst"], 2)  # CE, then SCST from its best checkpoint
    return None


def _write_results(
    ablation: Ablation, rows: list[dict[str, Any]], probes: dict[str, Any] | None = None
) -> None:

    results = {
        "ablation": str(ablation.path),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    atomic_write_json(
        ablation.output_dir / RESULTS_FILE, {**results, **({"probes": probes} if probes else {})}
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


COLUMNS = (
    ("CIDEr", "CIDEr"),
    ("direction_acc", "direction"),
    ("axis_acc", "axis"),
    ("color_acc", "colour"),
    ("shape_acc", "shape"),
)


def format_ablation_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: one line per row, scores x 100, training time in seconds."""
    width = max([len("variant"), *(len(r["row"]) for r in rows)]) + 2
    header = f"{'variant':<{width}}" + "".join(f"{title:>11}" for _, title in COLUMNS) + f"{'train s':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(
            f"{100 * row[k]:>11.1f}" if row.get(k) is not None else f"{'-':>11}" for k, _ in COLUMNS
        )
        train = f"{row['train_s']:>10.0f}" if row.get("train_s") is not None else f"{'-':>10}"
        lines.append(f"{row['row']:<{width}}{cells}{train}")
    lines.append(
        "(test split, x 100: CIDEr; share of captions stating the right direction (needs frame order), "
        "axis, colour, shape)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


@click.command("ablate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ablation_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--only", "only", multiple=True, metavar="VARIANT", help="Run only this variant (repeatable).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key in every variant (repeatable).",
)
@click.option(
    "--force", "force", multiple=True, metavar="STAGE", help="Redo this stage in each variant ('all')."
)
@click.option("--output-dir", default=None, help="Folder of the ablation (default: the file's output_dir).")
def ablate(
    ablation_file: str,
    only: tuple[str, ...],
    overrides: tuple[str, ...],
    force: tuple[str, ...],
    output_dir: str | None,
) -> None:
    """Train the variants of an ablation file from one shared feature cache and print one table.

    Re-running continues where a killed run stopped; finished variants are skipped.
    """
    user_errors(run_ablations)(ablation_file, list(only), list(overrides), list(force), output_dir)


def main(argv: list[str] | None = None) -> None:
    ablate.main(args=argv, prog_name="python -m pipeline.app.ablate")


if __name__ == "__main__":
    main()
