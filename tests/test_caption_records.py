"""Caption records say how they were made, a resume must match them, and failed videos can be retried.

A tiny random BLIP-2 (the session's `tiny_world`) captions the synthetic world's videos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipeline.config import config_from_dict
from pipeline.runtime.hashing import folder_sha256
from pipeline.runtime.records import drop_error_records, merge_parts, recorded_videos
from pipeline.runtime.stage import StageError
from stages.caption import SETTINGS_KEYS, caption_videos, model_identity


def _config(**caption):
    return config_from_dict({
        "model": {"num_frames": 4, "image_size": 32},
        "decode": {"backend": "pyav"},
        "caption": {"batch_size": 2, "num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 1, **caption},
    })  # fmt: skip


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def videos(tiny_world):
    return [str(p) for p in sorted(Path(tiny_world["videos"]).glob("*.mp4"))[:3]]


def _copy_with_other_weights(model: str, dest: Path) -> Path:
    """The same model folder, with one weight changed (what a retrained model in the same place is)."""
    shutil.copytree(model, dest)
    (weights,) = dest.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights))
    return dest


def test_every_record_states_the_model_hash_and_the_decoding(tiny_world, videos, tmp_path):
    out = tmp_path / "o.jsonl"
    caption_videos(videos[:1], tiny_world["model"], str(out), _config())
    (record,) = _records(out)
    assert record["model_sha256"] == folder_sha256(tiny_world["model"]) and len(record["model_sha256"]) == 64
    assert {k: record.get(k) for k in SETTINGS_KEYS} == {
        "model_sha256": record["model_sha256"],
        "num_frames": 4,
        "image_size": 32,
        "sampling": "uniform",
        "num_beams": 2,
        "max_new_tokens": 6,
        "min_new_tokens": 1,
        "window_s": None,
    }
    assert model_identity("Salesforce/blip2-opt-2.7b") == "hub:Salesforce/blip2-opt-2.7b"


def test_resuming_with_another_model_or_decoding_is_refused_listing_the_differences(
    tiny_world, videos, tmp_path
):
    out = tmp_path / "o.jsonl"
    caption_videos(videos[:1], tiny_world["model"], str(out), _config())
    before = out.read_bytes()
    other = _copy_with_other_weights(tiny_world["model"], tmp_path / "retrained")
    with pytest.raises(StageError, match="model_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        caption_videos(videos, str(other), str(out), _config())
    with pytest.raises(StageError) as err:
        caption_videos(videos, tiny_world["model"], str(out), _config(num_beams=3, max_new_tokens=8))
    assert "num_beams: 2 -> 3" in str(err.value) and "max_new_tokens: 6 -> 8" in str(err.value)
    with pytest.raises(StageError, match="image_size: 32 -> 48"):
        caption_videos(videos, tiny_world["model"], str(out), config_from_dict({
            "model": {"num_frames": 4, "image_size": 48},
            "caption": {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 1},
        }))  # fmt: skip
    assert out.read_bytes() == before  # nothing was mixed in

    moved = Path(shutil.copytree(tiny_world["model"], tmp_path / "moved"))  # same files elsewhere: same model
    summary = caption_videos(videos, str(moved), str(out), _config())
    assert summary["skipped"] == 1 and summary["captioned"] == 2 and out.read_bytes().startswith(before)


def test_retry_errors_recaptions_only_the_failed_videos(tiny_world, videos, tmp_path):
    late = tmp_path / "late.mp4"  # missing on the first run
    out = tmp_path / "o.jsonl"
    inputs = [*videos[:2], str(late)]
    first = caption_videos(inputs, tiny_world["model"], str(out), _config())
    assert first["errors"] == 1 and "no such file" in _records(out)[-1]["error"]
    good = [r for r in _records(out) if "error" not in r]
    shutil.copy(videos[2], late)

    again = caption_videos(inputs, tiny_world["model"], str(out), _config())
    assert again["captioned"] == 0 and again["skipped"] == 3  # without the flag an error is final

    retried = caption_videos(inputs, tiny_world["model"], str(out), _config(), retry_errors=True)
    assert retried["retried"] == 1 and retried["captioned"] == 1 and retried["skipped"] == 2
    records = _records(out)
    assert records[:2] == good  # the others untouched, byte for byte in order
    assert records[2]["video"] == str(late) and records[2]["caption"] and "error" not in records[2]


def test_the_cli_takes_retry_errors(tiny_world, tmp_path):
    from click.testing import CliRunner

    from pipeline.app.cli import main

    out = tmp_path / "o.jsonl"
    args = ["caption", str(tmp_path / "gone.mp4"), "--model", tiny_world["model"], "--out", str(out)]
    args += ["--set", "model.num_frames=4", "--set", "model.image_size=32", "--set", "caption.num_beams=1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--retry-errors"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["retried"] == 1 and summary["errors"] == 1 and len(_records(out)) == 1


def test_drop_error_records_keeps_the_rest_and_the_file_mode(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"video": "/a", "caption": "x"}\n{"video": "/b", "error": "bad"}\n{"video": "/c", "cap')
    out.chmod(0o640)
    assert drop_error_records(out) == 1
    assert out.read_text() == '{"video": "/a", "caption": "x"}\n' and (out.stat().st_mode & 0o777) == 0o640
    assert drop_error_records(out) == 0 and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def test_a_windowed_video_that_fails_part_way_counts_as_one_error(tmp_path):
    out, parts = tmp_path / "o.jsonl", tmp_path / "o.jsonl.parts"
    parts.mkdir()
    windows = [
        {"video": "/x", "caption": f"w{i}", "start": float(i), "window": i, "windows": 5} for i in range(2)
    ]
    lines = [
        *windows,
        {"video": "/x", "error": "/x: decoding failed at 2.0 s"},
        {"video": "/y", "caption": "y"},
    ]
    (parts / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert merge_parts(out, parts, ["/x", "/y"]) == 2
    assert [r.get("error", r.get("caption")) for r in _records(out)] == ["/x: decoding failed at 2.0 s", "y"]
    assert recorded_videos(out) == {"/x", "/y"}


def test_a_base_model_at_its_own_image_size_records_and_decodes_that_size(tiny_world, videos, tmp_path):
    from pipeline.vision import checkpoint_image_size

    config = config_from_dict({
        "decode": {"backend": "pyav"},
        "model": {"num_frames": 4},  # image_size 0: the checkpoint's own
        "caption": {"batch_size": 2, "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 1},
    })  # fmt: skip
    out = tmp_path / "o.jsonl"
    summary = caption_videos(videos[:1], tiny_world["model"], str(out), config)
    (record,) = _records(out)
    assert summary["errors"] == 0 and record["caption"]
    assert record["image_size"] == checkpoint_image_size(tiny_world["model"]) > 0
