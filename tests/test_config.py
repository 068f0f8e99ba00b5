"""The config schema: loading, overrides, errors that name the key, fingerprints, presets."""

from pathlib import Path

import pytest

from pipeline.config import (
    STAGE_KEYS,
    Config,
    ConfigError,
    config_from_dict,
    config_reference,
    load_config,
    stage_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_the_paper_recipe():
    config = Config()
    # prompt and min_new_tokens unset: each LM flavour's seed values (tests/test_flavours.py)
    assert (config.model.num_frames, config.model.image_size, config.model.prompt) == (
        8,
        0,
        None,
    )  # 0: the checkpoint's 224
    assert (config.train.lr, config.train.min_lr, config.train.weight_decay) == (5e-5, 1e-5, 0.05)
    assert (config.eval.num_beams, config.eval.max_new_tokens, config.eval.min_new_tokens) == (5, 32, None)
    assert config.decode.backend == "pyav"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_frames: 16\ntrain:\n  lr: 1.0e-4\n")
    config = load_config(path, ["train.epochs=3", "model.temporal_embeddings=true", "eval.models=ce,scst"])
    assert config.model.num_frames == 16
    assert config.train.lr == 1e-4 and config.train.epochs == 3
    assert config.model.temporal_embeddings is True
    assert config.eval.models == ["ce", "scst"]
    assert config.source == str(path)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  num_frame: 8\n", "unknown key model.num_frame (did you mean model.num_frames?)"),
        ("modle:\n  num_frames: 8\n", "unknown section 'modle'"),
        ("model:\n  fusion: sum\n", "model.fusion must be one of concat, mean"),
        ("train:\n  epochs: many\n", "train.epochs must be int"),
        ("model:\n  temporal_embeddings: maybe\n", "model.temporal_embeddings must be true or false"),
        (
            "train:\n  batch_size: 6\n  grad_accum: 4\n",
            "train.batch_size (6) must be divisible by train.grad_accum (4)",
        ),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="unknown key train.learning_rate"):
        load_config(None, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["lr=1"])


def test_fingerprints_depend_on_exactly_their_settings():
    base = Config()
    fp = {stage: stage_fingerprint(base, stage) for stage in STAGE_KEYS}
    more_frames = config_from_dict({"model": {"num_frames": 16}})
    assert stage_fingerprint(more_frames, "extract") != fp["extract"]
    assert stage_fingerprint(more_frames, "train") != fp["train"]  # train reads extract's output
    other_lr = config_from_dict({"train": {"lr": 1e-4}})
    assert stage_fingerprint(other_lr, "extract") == fp["extract"]  # extraction does not care
    assert stage_fingerprint(other_lr, "train") != fp["train"]
    assert stage_fingerprint(other_lr, "eval") != fp["eval"]  # evaluates a different model
    log_more = config_from_dict({"train": {"log_every": 1}})
    assert stage_fingerprint(log_more, "train") == fp["train"]  # logging does not change outputs
    assert stage_fingerprint(Config(), "train") == fp["train"]  # stable


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    from pipeline.app.ablate import is_ablation_file, load_ablation

    if is_ablation_file(path):  # a base config + variants: each variant must be a valid config
        ablation = load_ablation(path)
        assert ablation.variants and all(v.config.model.pretrained for v in ablation.variants.values())
        return
    config = load_config(path)
    assert config.model.pretrained


def test_readme_configuration_reference_matches_schema():
    readme = (ROOT / "README.md").read_text()
    assert config_reference() in readme, (
        "README's configuration reference is stale: paste `vidcap config-reference`"
    )
