"""Bad inputs end in one clear message before any work: config values, input paths, a full disk.

Also: files written atomically respect the umask, as any other file vidcap writes.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import pipeline.runtime.files
from pipeline.config import METRIC_NAMES, ConfigError, check_stage_inputs, config_from_dict, load_config
from pipeline.errors import DiskFullError, StageError
from pipeline.runtime.commandline import user_errors
from pipeline.runtime.files import atomic_write_json
from pipeline.runtime.stage import Stage


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("run.device=gpu0", "run.device must be auto, cpu, cuda or cuda:N"),
        ("run.device=cuda:x", "run.device must be auto, cpu, cuda or cuda:N"),
        ("run.threads=-1", "run.threads must be >= 0, got -1"),
        ("data.max_videos=-3", "data.max_videos must be >= 0"),
        ("extract.batch_size=0", "extract.batch_size must be positive, got 0"),
        ("extract.decode_workers=-1", "extract.decode_workers must be >= 0"),
        ("train.epochs=-1", "train.epochs must be >= 0, got -1"),
        ("train.epochs=0", "train.epochs (with train.max_steps 0) must be positive, got 0"),
        ("train.lr=0", "train.lr must be positive, got 0"),
        ("train.lr=-1e-4", "train.lr must be positive"),
        ("train.min_lr=1e-3", "train.min_lr (0.001) must not exceed train.lr (5e-05)"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be positive, got 0"),
        ("train.log_every=0", "train.log_every must be positive, got 0"),
        ("train.num_workers=-2", "train.num_workers must be >= 0"),
        ("scst.batch_size=0", "scst.batch_size must be positive, got 0"),
        ("scst.samples=0", "scst.samples must be positive, got 0"),
        ("scst.checkpoint_every=0", "scst.checkpoint_every must be positive"),
        ("scst.log_every=-1", "scst.log_every must be positive"),
        ("scst.lr=0", "scst.lr must be positive"),
        ("scst.top_p=0", "scst.top_p must be in (0, 1]"),
        ("scst.top_p=1.5", "scst.top_p must be in (0, 1]"),
        ("scst.temperature=0", "scst.temperature must be in (0, inf]"),
        ("scst.max_new_tokens=0", "scst.max_new_tokens must be positive, got 0"),
        ("eval.num_beams=0", "eval.num_beams must be positive, got 0"),
        ("eval.batch_size=0", "eval.batch_size must be positive"),
        ("eval.min_new_tokens=40", "eval.min_new_tokens (40) must not exceed eval.max_new_tokens (32)"),
        ("eval.metrics=[Bleu, CIDEr-D]", "eval.metrics: unknown metric 'CIDEr-D'; choose from Bleu"),
        ("eval.models=[]", "eval.models is empty"),
        ("caption.window=-0.5", "caption.window must be >= 0 seconds"),
        ("caption.window=.nan", "caption.window must be >= 0 seconds"),
        (
            "caption.min_new_tokens=40",
            "caption.min_new_tokens (40) must not exceed caption.max_new_tokens (32)",
        ),
        ("caption.num_beams=-1", "caption.num_beams must be positive"),
        ("caption.batch_size=0", "caption.batch_size must be positive"),
        ("model.lora_dropout=1", "model.lora_dropout must be in [0, 1)"),
        ("model.lora_r=0", "model.lora_r must be positive"),
        ("model.max_caption_tokens=0", "model.max_caption_tokens must be positive"),
        ("cache.codec_level=12", "cache.codec_level (codec blosc-zstd) must be in [0, 9], got 12"),
        ("decode.threads=-1", "decode.threads must be >= 0"),
    ],
)
def test_every_bad_value_is_refused_at_load_naming_key_and_value(tmp_path, override, fragment):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert fragment in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_device_strings_load(device):
    assert config_from_dict({"run": {"device": device}}).run.device == device


def test_metric_names_are_those_the_metrics_module_computes():
    from pipeline.metrics import DEFAULT_METRICS, METRICS

    assert tuple(METRIC_NAMES) == tuple(METRICS) and set(DEFAULT_METRICS) <= set(METRIC_NAMES)


def test_annotations_that_are_a_folder_or_missing_are_refused_when_a_stage_starts(tmp_path):
    folder = tmp_path / "ann"
    folder.mkdir()
    config = config_from_dict(
        {"run": {"output_dir": str(tmp_path / "run")}, "data": {"annotations": str(folder)}}
    )
    with pytest.raises(
        ConfigError, match=r"data.annotations=.*ann is a folder; data.format=jsonl needs a file"
    ):
        Stage(config, "train")
    assert not (tmp_path / "run").exists()  # refused before the stage made its folder
    config = config_from_dict({"data": {"annotations": str(tmp_path / "gone.jsonl")}})
    with pytest.raises(ConfigError, match="data.annotations: no such file or folder .*gone.jsonl"):
        check_stage_inputs(config, "extract")
    check_stage_inputs(config, "caption")  # captioning reads no annotations


def test_a_model_folder_that_does_not_exist_is_named(tmp_path):
    config = config_from_dict({"model": {"pretrained": str(tmp_path / "no-such-model")}})
    with pytest.raises(ConfigError, match="model.pretrained: no such model folder .*no-such-model"):
        check_stage_inputs(config, "eval")
    hub = config_from_dict({"model": {"pretrained": "Salesforce/blip2-opt-2.7b"}})
    check_stage_inputs(hub, "eval")  # a hub id is not a local path


# ---------------------------------------------------------------------------------------
# A full disk: one line naming the path and the free space; nothing torn or half-deleted
# ---------------------------------------------------------------------------------------


def _disk_full_on_write(monkeypatch):
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.runtime.files.os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))


def test_a_full_disk_during_an_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "DONE.json"
    atomic_write_json(target, {"old": True})
    _disk_full_on_write(monkeypatch)
    with pytest.raises(DiskFullError) as err:
        atomic_write_json(target, {"new": True})
    assert str(target) in str(err.value) and "free there" in str(err.value)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["DONE.json"]  # no temporary file left behind


def test_a_full_disk_when_a_stage_finishes_leaves_it_unfinished(tmp_path, monkeypatch):
    config = config_from_dict({"run": {"output_dir": str(tmp_path / "run")}})
    stage = Stage(config, "eval")
    _disk_full_on_write(monkeypatch)
    with pytest.raises(DiskFullError, match="DONE.json"):
        stage.finish({"cider": 1.0})
    assert not (stage.dir / "DONE.json").exists()


def test_the_cli_prints_one_line_for_a_full_disk_and_user_errors(tmp_path):
    where = tmp_path / "out.jsonl"

    @click.command()
    @click.argument("kind")
    @user_errors
    def command(kind: str) -> None:
        if kind == "disk":
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        if kind == "stage":
            raise StageError("stage 'train' cannot run: no cache")
        raise RuntimeError("a bug")

    result = CliRunner().invoke(command, ["disk"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("vidcap: error: no space left on the device writing " + str(where))
    assert "free there" in lines[0] and "Traceback" not in result.output
    result = CliRunner().invoke(command, ["stage"])
    assert result.exit_code == 1 and result.output == "vidcap: error: stage 'train' cannot run: no cache\n"
    result = CliRunner().invoke(command, ["bug"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)  # bugs keep their traceback


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "b.json", "w") as f:  # what any plain write gets
            f.write("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "b.json").stat().st_mode)


# ---------------------------------------------------------------------------------------
# Exports: what they reference, said in one line when it is gone; --merge-lora needs nothing
# ---------------------------------------------------------------------------------------


def test_an_export_whose_base_moved_is_one_clear_error_and_a_merged_one_needs_nothing(tiny_world, tmp_path):
    import shutil

    from pipeline.app.cli import main
    from pipeline.config import ModelConfig
    from pipeline.model import VideoCaptioner

    base = Path(shutil.copytree(tiny_world["model"], tmp_path / "base"))
    cfg = ModelConfig(pretrained=str(base), num_frames=4, image_size=32)
    model = VideoCaptioner.from_pretrained(base, cfg, load_vision=True)
    model.save_trained(tmp_path / "light")
    model.save_trained(tmp_path / "full", merge_lora=True)
    base.rename(tmp_path / "moved")

    with pytest.raises(StageError, match=r"needs its base model .*base \(`pretrained` in video_model.json\)"):
        VideoCaptioner.from_trained(tmp_path / "light")
    assert VideoCaptioner.from_trained(tmp_path / "full").cfg.num_frames == 4  # self-contained

    args = [
        "caption",
        str(tmp_path / "none.mp4"),
        "--model",
        str(tmp_path / "light"),
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.startswith("vidcap: error: ")
    assert "--merge-lora" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        main, ["caption", "x.mp4", "--model", str(tmp_path / "gone"), "--out", str(tmp_path / "p.jsonl")]
    )
    assert (
        result.exit_code == 1
        and result.output == f"vidcap: error: no such model folder {tmp_path / 'gone'}\n"
    )


# ---------------------------------------------------------------------------------------
# Input files and command arguments: one line naming the file (and line), no traceback
# ---------------------------------------------------------------------------------------


def test_annotations_that_are_not_utf8_name_the_file_and_line(tmp_path):
    from pipeline.annotations import read_jsonl
    from pipeline.errors import AnnotationError

    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"video_id": "a", "split": "train", "video": "a.mp4"}\n{"video_id": "caf\xe9"}\n')
    with pytest.raises(AnnotationError, match=r"a.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(path)


def test_score_with_malformed_or_undecodable_inputs_is_one_line(tmp_path):
    from pipeline.app.cli import main

    gts, res = tmp_path / "gts.json", tmp_path / "res.json"
    gts.write_text(json.dumps({"annotations": [{"image_id": "v", "caption": "a cat"}]}))
    res.write_text(json.dumps([{"video_id": 1}]))
    result = CliRunner().invoke(main, ["score", str(gts), str(res), "--impl", "fast"])
    assert (
        result.exit_code == 1 and result.output.startswith("vidcap: error: ") and "record 0" in result.output
    )
    res.write_bytes(b"\xff\xfe[]")
    result = CliRunner().invoke(main, ["score", str(gts), str(res), "--impl", "fast"])
    assert (
        result.exit_code == 1 and "not UTF-8 text" in result.output and len(result.output.splitlines()) == 1
    )


def test_bad_command_arguments_are_refused_by_the_command_line(tmp_path):
    from pipeline.app.cli import MODEL_PRESETS, main
    from pipeline.demo.testmodels import PRESETS

    assert tuple(MODEL_PRESETS) == tuple(PRESETS)
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "w"), "--videos", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output
    result = CliRunner().invoke(main, ["init-model", str(tmp_path / "m"), "--preset", "bogus"])
    assert result.exit_code == 2 and "'bogus' is not one of 'tiny-t5'" in result.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "m").exists()


def test_torch_and_safetensors_disk_full_errors_are_recognised(tmp_path, monkeypatch):
    from pipeline.runtime.files import disk_full_names

    torch_error = RuntimeError(
        "[enforce fail] PytorchStreamWriter failed writing file data/0: file write failed"
    )
    monkeypatch.setattr(pipeline.runtime.files, "free_bytes", lambda path: 4096)
    with (
        pytest.raises(DiskFullError, match=r"state.pt \(4.1 KB free there\)"),
        disk_full_names(tmp_path / "state.pt"),
    ):
        raise torch_error
    with (
        pytest.raises(DiskFullError, match="trainable.safetensors"),
        disk_full_names(tmp_path / "trainable.safetensors"),
    ):
        raise Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    monkeypatch.setattr(pipeline.runtime.files, "free_bytes", lambda path: 10 << 30)
    with pytest.raises(RuntimeError, match="file write failed"), disk_full_names(tmp_path / "state.pt"):
        raise torch_error  # with room left it is something else


def test_a_full_disk_while_captioning_names_the_file_and_a_rerun_finishes(tiny_world, tmp_path, monkeypatch):
    import stages.caption
    from stages.caption import caption_videos

    videos = [str(p) for p in sorted(Path(tiny_world["videos"]).glob("*.mp4"))[:2]]
    config = config_from_dict({
        "model": {"num_frames": 4, "image_size": 32},
        "caption": {"batch_size": 1, "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 1},
    })  # fmt: skip
    out = tmp_path / "o.jsonl"
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stages.caption.os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"o.jsonl.parts/.*\.jsonl \("):
        caption_videos(videos, tiny_world["model"], str(out), config)
    monkeypatch.setattr(stages.caption.os, "fsync", real_fsync)
    summary = caption_videos(videos, tiny_world["model"], str(out), config)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["video"] for r in records) == sorted(videos) and summary["errors"] == 0


def test_a_split_whose_captions_are_all_blank_is_refused_naming_it(tmp_path):
    from pipeline.annotations import read_jsonl, require_references
    from pipeline.errors import AnnotationError

    path = tmp_path / "a.jsonl"
    rows = [
        {"video_id": "a", "split": "train", "captions": ["", "  "]},
        {"video_id": "b", "split": "train", "captions": []},
        {"video_id": "c", "split": "val", "captions": ["a cat"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = read_jsonl(path)
    with pytest.raises(
        AnnotationError, match=r"a.jsonl: split 'train' has 2 videos but no reference captions"
    ):
        require_references(manifest, "train")
    require_references(manifest, "val")


def test_a_bad_override_without_a_file_is_named_as_one(tmp_path):
    from pipeline.app.cli import main

    result = CliRunner().invoke(main, ["show-config", "--set", "run.device=gpu0"])
    assert result.exit_code == 1
    assert result.output == (
        "vidcap: error: --set: run.device must be auto, cpu, cuda or cuda:N (N a GPU index); got 'gpu0'\n"
    )
