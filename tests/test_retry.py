"""`extract --retry-failed`: the videos the cache marks failed are attempted again, the rest kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from cache.store import FeatureStore
from pipeline.config import config_from_dict


def _world_with_a_late_video(tiny_world, root: Path) -> tuple[Path, Path]:
    """Annotations of 3 of the tiny world's videos plus `late.mp4`, which does not exist yet."""
    rows = [json.loads(line) for line in Path(tiny_world["annotations"]).read_text().splitlines()[:3]]
    late = root / "late.mp4"
    rows.append({**rows[0], "video_id": "late", "video": str(late)})
    annotations = root / "annotations.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return annotations, late


def _config(tiny_world, root: Path, annotations: Path):
    return config_from_dict({
        "run": {"output_dir": str(root / "run"), "device": "cpu"},
        "data": {"annotations": str(annotations), "video_root": tiny_world["videos"]},
        "decode": {"backend": "pyav"},
        "model": {"pretrained": tiny_world["model"], "num_frames": 4, "image_size": 32},
        "extract": {"batch_size": 2, "decode_workers": 1},
    })  # fmt: skip


def test_retry_failed_extracts_only_the_failed_videos(tiny_world, tmp_path):
    from stages.extract import run

    annotations, late = _world_with_a_late_video(tiny_world, tmp_path)
    config = _config(tiny_world, tmp_path, annotations)
    first = run(config)
    store = FeatureStore.open(config.cache_path)
    assert first["done"] == 3 and list(store.failed()) == ["late"]
    done_chunks = {p: p.stat().st_mtime_ns for p in (config.cache_path / "tokens").rglob("*") if p.is_file()}
    assert len(done_chunks) >= 3
    shutil.copy(next(Path(tiny_world["videos"]).glob("*.mp4")), late)

    assert run(config) == first  # finished: without the flag nothing is attempted again
    second = run(config, retry_failed=True)
    store = FeatureStore.open(config.cache_path)
    assert second["done"] == 1 and store.failed() == {} and store.done_ids() == {*store.video_ids}
    for path, mtime in done_chunks.items():  # the videos done before were not written again
        assert path.stat().st_mtime_ns == mtime
    assert run(config, retry_failed=True) == second  # nothing failed: the finished stage is skipped


def test_the_cli_takes_retry_failed(tiny_world, tmp_path):
    from pipeline.app.cli import main

    annotations, late = _world_with_a_late_video(tiny_world, tmp_path)
    config = _config(tiny_world, tmp_path, annotations)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps(config.to_dict()))
    assert CliRunner().invoke(main, ["extract", "--config", str(config_file)]).exit_code == 0
    shutil.copy(next(Path(tiny_world["videos"]).glob("*.mp4")), late)
    result = CliRunner().invoke(main, ["extract", "--config", str(config_file), "--retry-failed"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == 1 and FeatureStore.open(config.cache_path).failed() == {}


def test_a_full_disk_during_extract_names_the_store_and_a_rerun_finishes(tiny_world, tmp_path, monkeypatch):
    import errno

    import pytest

    from pipeline.errors import DiskFullError
    from stages.extract import run

    annotations, late = _world_with_a_late_video(tiny_world, tmp_path)
    shutil.copy(next(Path(tiny_world["videos"]).glob("*.mp4")), late)
    config = _config(tiny_world, tmp_path, annotations)
    real, written = FeatureStore.write_video, []

    def fills_up(store, video_id, tokens):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(store, video_id, tokens)
        written.append(video_id)

    monkeypatch.setattr(FeatureStore, "write_video", fills_up)
    with pytest.raises(DiskFullError, match=rf"{config.cache_path} \(.* free there\)"):
        run(config)
    monkeypatch.setattr(FeatureStore, "write_video", real)
    assert FeatureStore.open(config.cache_path).done_ids() == set(written)  # what was written is kept
    summary = run(config)
    store = FeatureStore.open(config.cache_path)
    assert summary["done"] == 2 and store.done_ids() == set(store.video_ids) and store.failed() == {}
