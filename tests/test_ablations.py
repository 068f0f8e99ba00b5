"""Ablations: the file format, variant validation, the shared cache, order-word accuracy, a tiny run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.app.ablate import (
    RESULTS_FILE,
    _forced_stages,
    ablate,
    format_ablation_table,
    is_ablation_file,
    load_ablation,
    run_ablations,
)
from pipeline.config import ConfigError, load_config
from pipeline.demo.facts import order_word_accuracy

ROOT = Path(__file__).resolve().parents[1]
DEMO_ABLATION = ROOT / "configs" / "ablations_demo.yaml"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def test_demo_ablation_validates_every_variant_and_shares_one_cache_per_frame_count():
    assert is_ablation_file(DEMO_ABLATION) and not is_ablation_file(ROOT / "configs" / "demo.yaml")
    ablation = load_ablation(DEMO_ABLATION)
    variants = ablation.variants
    assert list(variants) == [
        "concat+temporal",
        "concat",
        "mean",
        "concat+temporal, frozen LLM",
        "concat+temporal, LoRA",
        "concat+temporal, 4 frames",
    ]
    full = variants["concat+temporal"].config
    assert full.run.stages == ["extract", "train", "scst", "eval"]
    assert full.eval.models == ["zero_shot", "ce", "scst"]
    assert variants["concat+temporal"].rows == {
        "zero_shot": "zero-shot",
        "ce": "concat+temporal",
        "scst": "concat+temporal + SCST",
    }
    for name in list(variants)[1:]:
        config = variants[name].config
        assert config.run.stages == ["extract", "train", "eval"] and config.eval.models == ["ce"]
        assert variants[name].rows == {"ce": name}
    settings = {
        name: (
            v.config.model.fusion,
            v.config.model.temporal_embeddings,
            v.config.model.llm,
            v.config.model.num_frames,
        )
        for name, v in variants.items()
    }
    assert settings == {
        "concat+temporal": ("concat", True, "full", 8),
        "concat": ("concat", False, "full", 8),
        "mean": ("mean", False, "full", 8),
        "concat+temporal, frozen LLM": ("concat", True, "frozen", 8),
        "concat+temporal, LoRA": ("concat", True, "lora", 8),
        "concat+temporal, 4 frames": ("concat", True, "full", 4),
    }
    assert variants["concat+temporal, LoRA"].config.model.lora_target_modules == ["q", "v"]
    # Each variant runs in its own folder; the 8-frame ones read one store, the 4-frame one its own.
    assert variants["concat+temporal, 4 frames"].config.output_dir == Path(
        "runs/ablations_demo/concat+temporal-4-frames"
    )
    caches = {name: v.config.cache_path for name, v in variants.items()}
    eight = {caches[n] for n in variants if n != "concat+temporal, 4 frames"}
    assert len(eight) == 1 and caches["concat+temporal, 4 frames"] not in eight
    assert all(p.parent == Path("runs/ablations_demo/cache") for p in caches.values())
    assert next(iter(eight)).name.startswith("8f-") and caches["concat+temporal, 4 frames"].name.startswith(
        "4f-"
    )
    # The rest is the demo's config.
    demo = load_config(ROOT / "configs/demo.yaml")
    assert full.model.pretrained == demo.model.pretrained and full.train == demo.train


def test_command_line_overrides_come_last_and_the_output_dir_can_move(tmp_path):
    ablation = load_ablation(
        DEMO_ABLATION, ["train.epochs=2", "model.num_frames=6"], output_dir=tmp_path / "a"
    )
    for variant in ablation.variants.values():
        assert variant.config.train.epochs == 2 and variant.config.model.num_frames == 6
        assert variant.config.output_dir.parent == tmp_path / "a"
    assert len({v.config.cache_path for v in ablation.variants.values()}) == 1  # all 6-frame now


def test_an_explicit_cache_path_is_kept(tmp_path):
    path = _write(
        tmp_path / "a.yaml",
        {"base": str(ROOT / "configs/demo.yaml"), "variants": {"x": ["cache.path=/data/mine.zarr"]}},
    )
    assert load_ablation(path).variants["x"].config.cache_path == Path("/data/mine.zarr")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"variants": {"x": []}}, "`base` is missing"),
        ({"base": "demo.yaml"}, "`variants` is missing"),
        ({"base": "demo.yaml", "varients": {}, "variants": {"x": []}}, "unknown key 'varients'"),
        ({"base": "demo.yaml", "variants": {"x": ["model.fusion=sum"]}}, "variant 'x'"),
        (
            {"base": "demo.yaml", "variants": {"x": ["model.fusion=sum"]}},
            "model.fusion must be one of concat, mean",
        ),
        ({"base": "demo.yaml", "variants": {"x": ["model.num_frame=4"]}}, "unknown key model.num_frame"),
        ({"base": "demo.yaml", "variants": {"x": {"sett": []}}}, "variant 'x': unknown key 'sett'"),
        ({"base": "demo.yaml", "variants": {"x": {"rows": {"best": "b"}}}}, "rows: 'best' is not one of"),
        ({"base": "demo.yaml", "variants": {"x": ["fusion"]}}, "expected a list of section.key=value"),
        ({"base": "demo.yaml", "variants": {"a b": [], "a-b": []}}, "would share"),
        ({"base": "nowhere.yaml", "variants": {"x": []}}, "cannot read config nowhere.yaml"),
    ],
)
def test_errors_name_the_file_the_variant_and_the_key(tmp_path, content, fragment):
    (tmp_path / "demo.yaml").write_text((ROOT / "configs/demo.yaml").read_text())  # base next to the file
    path = _write(tmp_path / "bad.yaml", content)
    with pytest.raises(ConfigError) as err:
        load_ablation(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_a_forced_extraction_rebuilds_a_shared_store_once():
    assert _forced_stages(["all"], cache_redone=False) == ["all"]
    assert _forced_stages(["all"], cache_redone=True) == ["train", "scst", "eval"]
    assert _forced_stages(["extract", "train"], cache_redone=True) == ["train"]
    assert _forced_stages(["eval"], cache_redone=True) == ["eval"]


def test_unknown_variant_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="no variant 'meen'; variants are concat\\+temporal, concat, mean"):
        run_ablations(DEMO_ABLATION, ["meen"], output_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# Scoring and the table
# ---------------------------------------------------------------------------------------

FACTS = {
    "v1": {"color": "red", "shape": "square", "direction": "right"},
    "v2": {"color": "blue", "shape": "circle", "direction": "up"},
    "v3": {"color": "green", "shape": "triangle", "direction": "left"},
    "v4": {"color": "yellow", "shape": "square", "direction": "down"},
}


def test_order_word_accuracy_on_hand_made_captions():
    captions = {
        "v1": "a red square moves from the left to the right",  # all right
        "v2": "a blue circle is moving down",  # played backwards: axis right, direction wrong
        "v3": "a red triangle starts at the right and ends at the left",  # colour wrong
        "v4": "a yellow circle slides across the screen",  # no direction; shape wrong
        "other": "a red square moving up",  # no known facts: not scored
    }
    predictions = [{"video_id": v, "caption": c} for v, c in captions.items()]
    assert order_word_accuracy(predictions, FACTS) == {
        "direction_acc": 2 / 4,
        "axis_acc": 3 / 4,
        "color_acc": 3 / 4,
        "shape_acc": 3 / 4,
    }
    assert order_word_accuracy(predictions, {}) == dict.fromkeys(
        ("direction_acc", "axis_acc", "color_acc", "shape_acc")
    )


def test_an_order_blind_model_gets_the_axis_but_half_the_directions():
    # One fixed direction per axis, whatever the frame order: right for left/right, down for up/down.
    guess = {"left": "right", "right": "right", "up": "down", "down": "down"}
    predictions = [
        {"video_id": v, "caption": f"a {f['color']} {f['shape']} moving {guess[f['direction']]}"}
        for v, f in FACTS.items()
    ]
    scores = order_word_accuracy(predictions, FACTS)
    assert scores["axis_acc"] == 1.0 and scores["direction_acc"] == 0.5
    assert scores["color_acc"] == scores["shape_acc"] == 1.0


def test_table_shows_scores_x100_and_dashes_for_missing_values():
    rows = [
        {"row": "zero-shot", "CIDEr": 0.012, "direction_acc": 0.25, "axis_acc": 0.5, "color_acc": None,
         "shape_acc": None, "train_s": None},
        {"row": "concat+temporal + SCST", "CIDEr": 1.5, "direction_acc": 0.875, "axis_acc": 1.0,
         "color_acc": 1.0, "shape_acc": 0.75, "train_s": 123.4},
    ]  # fmt: skip
    lines = format_ablation_table(rows).splitlines()
    assert lines[0].split() == ["variant", "CIDEr", "direction", "axis", "colour", "shape", "train", "s"]
    assert lines[2].split() == ["zero-shot", "1.2", "25.0", "50.0", "-", "-", "-"]
    assert lines[3].split()[-6:] == ["150.0", "87.5", "100.0", "100.0", "75.0", "123"]


# ---------------------------------------------------------------------------------------
# End to end: two variants, one extraction
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    """A 20-video world (12 train, 4 val, 4 test), an untrained tiny T5 BLIP-2 and an ablation of two 1-epoch variants."""
    import torch

    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model

    torch.set_num_threads(1)  # 2 shared cores: tiny models gain nothing from more threads
    root = tmp_path_factory.mktemp("ablation")
    world = make_synthetic_world(root / "world", num_videos=20, seed=0, frames=8, size=32)
    model = init_model(root / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    settings = {
        "run.prepare": "",
        "run.device": "cpu",
        "data.annotations": world["annotations"],
        "data.video_root": world["videos"],
        "model.pretrained": str(model),
        "model.num_frames": 4,
        "train.epochs": 1,
        "train.batch_size": 4,
        "train.warmup_steps": 1,
        "train.val_max_videos": 2,
        "eval.num_beams": 1,
        "eval.max_new_tokens": 8,
        "eval.min_new_tokens": 1,
    }
    path = _write(
        root / "tiny_ablation.yaml",
        {
            "base": str(ROOT / "configs/demo.yaml"),
            "output_dir": str(root / "runs"),
            "set": [f"{k}={json.dumps(v)}" for k, v in settings.items()],
            "variants": {
                "concat": ["model.temporal_embeddings=false"],
                "concat+temporal": ["model.temporal_embeddings=true"],
            },
        },
    )
    return path, run_ablations(path)


@pytest.mark.slow
def test_two_variants_train_from_one_extraction(tiny_ablation):
    path, rows = tiny_ablation
    assert [r["row"] for r in rows] == ["concat", "concat+temporal"]
    first, second = rows
    assert (
        first["cache"] == second["cache"]
        and len([p for p in (path.parent / "runs/cache").iterdir() if not p.name.startswith(".")]) == 1
    )  # beside its lock file
    assert first["extract"]["done"] == 20 and first["extract"]["skipped"] == 0
    assert second["extract"]["done"] == 0 and second["extract"]["skipped"] == 20  # no video touched again
    for row in rows:
        assert row["num_videos"] == 4 and row["CIDEr"] >= 0 and row["train_s"] > 0
        assert all(0 <= row[f"{k}_acc"] <= 1 for k in ("direction", "axis", "color", "shape"))
    saved = json.loads((path.parent / "runs" / RESULTS_FILE).read_text())
    assert saved["rows"] == rows
    probes = saved["probes"][Path(first["cache"]).stem]  # the shared cache, probed once
    assert set(probes) == {"ordered", "frame_mean"} and all(0 <= a <= 1 for a in probes["ordered"].values())


@pytest.mark.slow
def test_rerunning_skips_every_stage_and_prints_the_same_table(tiny_ablation):
    path, rows = tiny_ablation
    result = CliRunner().invoke(ablate, [str(path), "--only", "concat+temporal"])
    assert result.exit_code == 0, result.output
    table = result.output[result.output.rindex("\nvariant ") + 1 :].splitlines()
    end = next(i for i, line in enumerate(table) if line.startswith("(test split"))
    assert [line.split()[0] for line in table[2:end]] == ["concat+temporal"]
    probes = table[end + 1 :]  # the linear probes of the shared cache follow the table
    assert probes[0].startswith("cache tokens") and [line.split()[1] for line in probes[2:4]] == [
        "ordered",
        "frame_mean",
    ]
    summary = json.loads((path.parent / "runs/concat+temporal/summary.json").read_text())
    assert {s["status"] for s in summary["stages"].values()} == {"skipped"}
    assert json.loads((path.parent / "runs" / RESULTS_FILE).read_text())["rows"] == rows


def test_cli_reports_a_bad_file_without_a_traceback(tmp_path):
    path = _write(
        tmp_path / "a.yaml", {"base": str(ROOT / "configs/demo.yaml"), "variants": {"x": ["model.llm=half"]}}
    )
    result = CliRunner().invoke(ablate, [str(path), "--output-dir", str(tmp_path / "out")])
    assert (
        result.exit_code == 1
        and "vidcap: error: " in result.output
        and "model.llm must be one of" in result.output
    )
    assert "Traceback" not in result.output
