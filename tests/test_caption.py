"""`vidcap caption`: inputs of every kind, error records, resuming, Dask, kill-and-resume, windows.

A tiny random BLIP-2 captions real encoded synthetic videos (its captions are nonsense, but
deterministic, which is what these tests need) next to broken files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.inputs import expand_inputs
from pipeline.runtime.records import merge_parts, read_records
from stages.caption import caption_videos

NUM_GOOD = 6
BROKEN = {
    "corrupt.mp4": "not a readable video",
    "empty.mp4": "empty file",
    "notvideo.avi": "not a readable video",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model

    root = tmp_path_factory.mktemp("caption")
    made = make_synthetic_world(root / "world", num_videos=NUM_GOOD, seed=1)
    videos = Path(made["videos"])
    (videos / "corrupt.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    )
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notvideo.avi").write_text("not a video\n" * 40)
    (videos / "notes.txt").write_text("not a video extension: ignored in folders\n")
    model = init_model(root / "tiny", "tiny-t5", vocab_from=made["annotations"], seed=0)
    return {"root": root, "videos": videos, "model": str(model)}


def _config(**caption):
    return config_from_dict({
        "model": {"num_frames": 4, "image_size": 32},
        "caption": {"batch_size": 2, "num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 1, **caption},
    })  # fmt: skip


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _by_video(records) -> dict[str, str]:
    return {r["video"]: r.get("caption", "ERROR " + r.get("error", "")) for r in records}


@pytest.fixture(scope="module")
def reference(world):
    """The folder captioned in-process once: (out path, summary)."""
    out = world["root"] / "ref.jsonl"
    return out, caption_videos([str(world["videos"])], world["model"], str(out), _config())


def test_a_folder_gives_one_record_per_video_file_errors_included(reference, world):
    out, summary = reference
    records = _records(out)
    videos = sorted(str(p) for p in world["videos"].iterdir() if p.suffix in (".mp4", ".avi"))
    assert sorted(r["video"] for r in records) == videos  # notes.txt is not a video file
    assert summary["captioned"] == NUM_GOOD and summary["errors"] == len(BROKEN) and summary["skipped"] == 0
    for record in records:
        assert (
            record["model"] == world["model"]
            and record["num_frames"] == 4
            and record["sampling"] == "uniform"
        )
        name = Path(record["video"]).name
        if name in BROKEN:
            assert BROKEN[name] in record["error"] and "caption" not in record
        else:
            assert record["caption"].strip() and "error" not in record
    assert summary["videos_per_s"] > 0 and summary["generate_s"] > 0 and summary["decode_s"] > 0
    assert not (out.parent / (out.name + ".parts")).exists()  # merged and cleaned up


def test_a_rerun_adds_nothing(reference, world):
    out, _ = reference
    before = out.read_bytes()
    summary = caption_videos([str(world["videos"])], world["model"], str(out), _config())
    assert summary["captioned"] == summary["errors"] == 0 and summary["skipped"] == NUM_GOOD + len(BROKEN)
    assert out.read_bytes() == before


def test_new_files_are_the_only_ones_captioned(world, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted(world["videos"].glob("synth*.mp4"))
    for path in good[:3]:
        shutil.copy(path, folder)
    out = tmp_path / "out.jsonl"
    assert caption_videos([str(folder)], world["model"], str(out), _config())["captioned"] == 3
    first = out.read_text()
    for path in good[3:5]:
        shutil.copy(path, folder)
    summary = caption_videos([str(folder)], world["model"], str(out), _config())
    assert summary["captioned"] == 2 and summary["skipped"] == 3
    assert out.read_text().startswith(first) and len(_records(out)) == 5


def test_inputs_files_folders_globs_and_manifests(world, tmp_path):
    videos = world["videos"]
    names = sorted(p.name for p in videos.glob("synth*.mp4"))
    lists = tmp_path / "lists"
    lists.mkdir()
    rel = os.path.relpath(videos, lists)
    (lists / "m.jsonl").write_text(json.dumps({"video_id": "a", "video": f"{rel}/{names[0]}"}) + "\n\n")
    (lists / "m.csv").write_text(f"video_id,path\nb,{rel}/{names[1]}\nc,{videos / names[2]}\n")
    (lists / "m.txt").write_text(f"# a comment\n{rel}/{names[3]}\n\n")
    items = expand_inputs([str(lists / "m.jsonl"), str(lists / "m.csv"), str(lists / "m.txt"),
                           str(videos / "synth*.mp4"), str(videos / names[0]), str(tmp_path / "gone.mp4")])  # fmt: skip
    paths = [it.video for it in items]
    expected = [str(videos / n) for n in names[:4]]
    assert paths[:4] == expected  # manifests first, relative paths from their folder
    assert [it.video_id for it in items[:3]] == ["a", "b", "c"]
    assert paths[4:-1] == [str(videos / n) for n in names[4:]]  # the glob adds the rest, each once
    assert paths[-1] == str(tmp_path / "gone.mp4") and len(set(paths)) == len(paths)


def test_the_cli_records_missing_inputs_as_errors(world, tmp_path):
    from click.testing import CliRunner

    from pipeline.app.cli import main

    out = tmp_path / "out.jsonl"
    args = ["caption", str(tmp_path / "gone.mp4"), "--model", world["model"], "--out", str(out)]
    args += ["--set", "model.num_frames=4", "--set", "model.image_size=32", "--set", "caption.num_beams=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    (record,) = _records(out)
    assert summary["errors"] == 1 and summary["captioned"] == 0 and "no such file" in record["error"]


@pytest.mark.parametrize(
    "processes", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["threads", "processes"]
)
def test_two_dask_workers_give_the_same_records(reference, world, tmp_path, processes, monkeypatch):
    import pipeline.runtime.cluster

    monkeypatch.setattr(pipeline.runtime.cluster, "LOCAL_WORKER_PROCESSES", processes)
    ref, _ = reference
    out = tmp_path / "dask.jsonl"
    summary = caption_videos([str(world["videos"])], world["model"], str(out), _config(workers=2))
    assert summary["mode"].startswith("dask: 2 workers")
    assert _by_video(_records(out)) == _by_video(_records(ref))
    assert len(_records(out)) == len(_records(ref))


_KILLABLE = """
import time
import pipeline.video
from pipeline.config import config_from_dict
from stages.caption import caption_videos

real = pipeline.video.load_clip
def slow_load_clip(*args, **kwargs):  # slow enough to be killed half way
    time.sleep(0.5)
    return real(*args, **kwargs)
pipeline.video.load_clip = slow_load_clip
caption_videos([{folder!r}], {model!r}, {out!r}, config_from_dict({config!r}))
"""


def test_sigkill_then_rerun_leaves_one_record_per_video(reference, world, tmp_path):
    ref, _ = reference
    out = tmp_path / "killed.jsonl"
    config = _config(batch_size=1, decode_workers=1)
    script = textwrap.dedent(_KILLABLE).format(
        folder=str(world["videos"]), model=world["model"], out=str(out), config=config.to_dict()
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL, start_new_session=True)
    parts = tmp_path / "killed.jsonl.parts"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum(len(list(read_records(p))) for p in parts.glob("*.jsonl")) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "captioning finished (or crashed) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r["video"] for p in parts.glob("*.jsonl") for r in read_records(p)}
    assert 2 <= len(before) < NUM_GOOD + len(BROKEN)

    summary = caption_videos([str(world["videos"])], world["model"], str(out), config)
    assert summary["skipped"] == len(before)  # what the killed run finished is kept, not redone
    assert summary["captioned"] + summary["errors"] == NUM_GOOD + len(BROKEN) - len(before)
    records = _records(out)
    assert len(records) == len({r["video"] for r in records}) == NUM_GOOD + len(BROKEN)
    assert _by_video(records) == _by_video(_records(ref))


def test_merge_skips_torn_lines_and_duplicates(tmp_path):
    out, parts = tmp_path / "o.jsonl", tmp_path / "o.jsonl.parts"
    parts.mkdir()
    out.write_text('{"video": "/a", "caption": "x"}\n{"video": "/b", "capt')  # torn by a kill
    (parts / "t1.jsonl").write_text('{"video": "/a", "caption": "again"}\n{"video": "/b", "caption": "y"}\n')
    (parts / "t2.jsonl").write_text('{"video": "/c", "caption": "z"}\n{"video": "/d", "cap')
    assert merge_parts(out, parts, ["/c", "/b", "/a"]) == 2
    assert _records(out) == [{"video": "/a", "caption": "x"}, {"video": "/c", "caption": "z"},
                             {"video": "/b", "caption": "y"}]  # fmt: skip
    assert not parts.exists()


def test_windows_caption_consecutive_spans(world, tmp_path):
    out = tmp_path / "windows.jsonl"
    video = sorted(world["videos"].glob("synth*.mp4"))[0]  # 16 frames at 8 fps: 2 s
    summary = caption_videos([str(video)], world["model"], str(out), _config(window=0.75))
    records = _records(out)
    assert summary["captioned"] == 1
    assert [(r["start"], r["end"], r["window"], r["windows"]) for r in records] == [
        (0.0, 0.75, 0, 3), (0.75, 1.5, 1, 3), (1.5, 2.0, 2, 3)
    ]  # fmt: skip
    assert all(r["caption"] for r in records)
    again = caption_videos([str(video)], world["model"], str(out), _config(window=0.75))
    assert again["skipped"] == 1 and len(_records(out)) == 3


def test_windows_never_end_in_an_empty_span():
    from pipeline.windows import window_spans

    assert window_spans(30.0001, 10) == [(0, 10), (10, 20), (20, 30.0)]  # not a 4th window [30.0, 30.0)
    assert window_spans(25, 10) == [(0, 10), (10, 20), (20, 25)]
    for duration in (0.5, 9.9996, 10.0, 30.0001, 86014 / 29.97):  # the last: 86014 frames at 29.97 fps
        spans = window_spans(duration, 10)
        assert all(end > start for start, end in spans) and spans[-1][1] == round(duration, 3)


def test_merge_completes_a_windowed_video_without_duplicating_its_windows(tmp_path):
    out, parts = tmp_path / "o.jsonl", tmp_path / "o.jsonl.parts"
    parts.mkdir()
    window = [
        {"video": "/x", "caption": f"w{i}", "start": 10.0 * i, "window": i, "windows": 3} for i in range(3)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in window[:2]))  # a kill during the append
    (parts / "t1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in window))
    assert merge_parts(out, parts, ["/x"]) == 1
    assert [r["window"] for r in _records(out)] == [0, 1, 2]


def test_a_video_that_raises_anything_gets_an_error_record(world, tmp_path, monkeypatch):
    import pipeline.video
    import stages.caption

    good = sorted(world["videos"].glob("synth*.mp4"))[:2]
    real = pipeline.video.load_clip

    def flaky(path, *args, **kwargs):
        if str(path) == str(good[0]):
            raise ValueError("something nobody foresaw")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(stages.caption, "load_clip", flaky)
    out = tmp_path / "o.jsonl"
    summary = caption_videos([str(p) for p in good], world["model"], str(out), _config())
    assert summary["errors"] == 1 and summary["captioned"] == 1
    errors = [r for r in _records(out) if "error" in r]
    assert len(errors) == 1 and "ValueError: something nobody foresaw" in errors[0]["error"]


def test_resuming_with_other_settings_is_refused(world, tmp_path):
    from pipeline.runtime.stage import StageError

    video = str(sorted(world["videos"].glob("synth*.mp4"))[0])
    out = tmp_path / "o.jsonl"
    caption_videos([video], world["model"], str(out), _config())
    with pytest.raises(StageError, match="other settings .*window_s: None -> 0.75"):
        caption_videos([video], world["model"], str(out), _config(window=0.75))
    with pytest.raises(StageError, match="num_frames: 4 -> 8"):
        caption_videos([video], world["model"], str(out), config_from_dict({"model": {"num_frames": 8}}))
    assert len(_records(out)) == 1  # nothing was added
