"""Windows of a long video decoded in one pass: the same frames as decoding each window on its own,
windows placed by the frames' timestamps, one decoding pass, and captioning as it goes."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline.windows
from pipeline.video import frame_times, load_clip, probe_video, write_video
from pipeline.windows import iter_windows, window_spans

FPS, NUM = 8, 83  # 10.375 s


def _frames(num: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames that differ from each other (a level and a moving bright column)."""
    frames = np.zeros((num, height, width, 3), np.uint8)
    for i in range(num):
        frames[i] = (i * 3) % 256
        frames[i, :, i % width] = 255
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    paths = {}
    for ext in (".mp4", ".webm", ".avi", ".mkv"):
        paths[ext] = root / f"long{ext}"
        write_video(paths[ext], _frames(NUM), fps=FPS)
    return paths


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi", ".mkv"])
@pytest.mark.parametrize("window_s", [0.75, 1.3, 4.0, 60.0])
def test_one_pass_gives_each_window_the_frames_of_decoding_it_alone(videos, ext, window_s):
    path = videos[ext]
    windows = list(iter_windows(path, 4, 32, window_s))
    assert [(w.start, w.end) for w in windows] == window_spans(NUM / FPS, window_s)
    assert [(w.index, w.count) for w in windows] == [(k, len(windows)) for k in range(len(windows))]
    for w in windows:
        reference = load_clip(path, 4, 32, backend="pyav", start_sec=w.start, end_sec=w.end)
        assert np.array_equal(w.frames, reference), (w.index, w.start)


def _variable_rate_video(path: Path, times_ms: list[int]) -> None:
    """Frame i is a flat grey of level 10 + 20 i, shown from times_ms[i] (rate given: 25 fps)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 + 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_windows_are_placed_by_the_frames_timestamps_not_index_over_rate(tmp_path):
    times_ms = [0, 100, 200, 1500, 1600, 3000, 3100, 3200, 3300, 3400]
    path = tmp_path / "vfr.mkv"
    _variable_rate_video(path, times_ms)
    assert np.allclose(frame_times(path), np.array(times_ms) / 1000)
    assert probe_video(path).duration == pytest.approx(3.44)
    windows = list(iter_windows(path, 2, 8, 1.0))
    shown = [np.round((w.frames.reshape(2, -1).mean(axis=1) - 10) / 20).astype(int).tolist() for w in windows]
    # time slots of 0.344 s, each showing the frame on screen at its middle: [0, 1) samples slots
    # 0 and 1 (0.17 s: frame 1, 0.52 s: frame 2); [3, 3.44) slots 8 and 9 (2.92 s: frame 4, still
    # on screen until 3.0 s; 3.27 s: frame 7). By index / fps they would be other frames.
    assert shown == [[1, 2], [2, 3], [4, 4], [4, 7]]
    assert [w.frame_times.tolist() for w in windows][:3] == [[0.1, 0.2], [0.2, 1.5], [1.6, 1.6]]
    for w in windows:
        assert np.array_equal(w.frames, load_clip(path, 2, 8, start_sec=w.start, end_sec=w.end))


def test_the_file_is_read_the_same_number_of_times_whatever_the_number_of_windows(videos, monkeypatch):
    opened = []
    real = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    assert len(list(iter_windows(videos[".mp4"], 4, 32, 0.25))) == 42
    many = len(opened)
    opened.clear()
    assert len(list(iter_windows(videos[".mp4"], 4, 32, 5.0))) == 3
    # the header checks, one demux pass for the timestamps, one decoding pass: not one per window
    assert many == len(opened) <= 4


def test_a_failure_part_way_raises_after_the_windows_before_it(videos, monkeypatch):
    from pipeline.errors import VideoDecodeError

    real = pipeline.windows._square_rgb
    calls = []

    def failing(frame, index, image_size):
        calls.append(1)
        if len(calls) > 10:
            raise VideoDecodeError("long.mp4", "decoding failed near 3.0 s: broken packet")
        return real(frame, index, image_size)

    monkeypatch.setattr(pipeline.windows, "_square_rgb", failing)
    got = []
    with pytest.raises(VideoDecodeError, match="broken packet"):
        for w in iter_windows(videos[".mp4"], 4, 32, 1.0):
            got.append(w.index)
    assert got == [0, 1]


def test_windowed_captioning_writes_as_it_goes_and_a_failure_is_one_error(
    tiny_world, videos, tmp_path, monkeypatch
):
    import stages.caption
    from pipeline.config import config_from_dict
    from stages.caption import caption_videos

    config = config_from_dict({
        "model": {"num_frames": 4, "image_size": 32},
        "caption": {"batch_size": 2, "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 1, "window": 1.5},
    })  # fmt: skip
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(stages.caption, "PROGRESS_EVERY_S", 0.0)  # report after every window
    summary = caption_videos(
        [str(videos[".mp4"]), str(videos[".mkv"])], tiny_world["model"], str(out), config
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["captioned"] == 2 and summary["errors"] == 0 and len(records) == 2 * 7
    assert [(r["window"], r["start"]) for r in records[:7]] == [(k, 1.5 * k) for k in range(7)]
    log = (tmp_path / "o.jsonl.log").read_text()
    assert f"{videos['.mp4']}: window 3/7 (4 s of video)" in log and f"{videos['.mkv']}: window 7/7" in log

    real = pipeline.windows._square_rgb
    calls = []

    def failing(frame, index, image_size):
        calls.append(1)
        if len(calls) > 12:  # in the 4th window of the first video
            raise RuntimeError("decoder fell over")
        return real(frame, index, image_size)

    monkeypatch.setattr(pipeline.windows, "_square_rgb", failing)
    out = tmp_path / "failed.jsonl"
    summary = caption_videos([str(videos[".webm"])], tiny_world["model"], str(out), config)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["errors"] == 1 and summary["captioned"] == 0 and "decoder fell over" in record["error"]


def test_memory_holds_a_few_batches_of_windows_however_long_the_video(
    tiny_world, videos, tmp_path, monkeypatch
):
    import stages.caption
    from pipeline.config import config_from_dict
    from stages.caption import caption_videos

    decoded, captioned, waiting = [], [], []  # windows decoded; per model call: captioned, waiting
    real_windows, real_caption = pipeline.windows.iter_windows, stages.caption._caption_batch

    def counting_windows(*args, **kwargs):
        for window in real_windows(*args, **kwargs):
            decoded.append(window.index)
            yield window

    def captioning(model, pixels, *args):
        waiting.append(len(decoded) - sum(captioned))  # decoded and not yet captioned
        captioned.append(pixels.shape[0])
        return real_caption(model, pixels, *args)

    monkeypatch.setattr(stages.caption, "iter_windows", counting_windows)
    monkeypatch.setattr(stages.caption, "_caption_batch", captioning)
    config = config_from_dict({
        "model": {"num_frames": 2, "image_size": 16},
        "caption": {"batch_size": 2, "decode_workers": 1, "num_beams": 1, "max_new_tokens": 2, "min_new_tokens": 1,
                    "window": 0.25},
    })  # fmt: skip
    summary = caption_videos([str(videos[".mp4"])], tiny_world["model"], str(tmp_path / "o.jsonl"), config)
    assert summary["captioned"] == 1 and len(decoded) == 42
    assert captioned == [2] * 21  # captioned batch by batch as the windows come
    assert max(waiting) <= 2 * 2 + 1 + 2 + 1  # prefetched (2 batches + decode_workers) + one batch, not 42


def test_the_benchmark_runs_and_prints_seconds_per_video_minute():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "benchmarks/bench_windows.py"), "--minutes", "0.1", "0.2",
            "--seek-minutes", "0.1", "--window", "2", "--image-size", "32", "--size", "64x48"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [(r[0], r[1], r[-4]) for r in rows] == [
        ("0.1", "3", "pass"),
        ("0.1", "3", "window"),
        ("0.2", "6", "pass"),
    ]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from pipeline.demo.videozoo import make_video_zoo

    root = tmp_path_factory.mktemp("zoo")
    return root, make_video_zoo(root)


def test_on_every_kind_of_file_the_windows_are_the_per_window_clips(zoo):
    """Rotated, variable-rate, corrupt-start, open-GOP, AVI without pts...: the one pass gives each
    window exactly `load_clip`'s frames for it."""
    from pipeline.demo.videozoo import ZOO

    root, videos = zoo
    checked = 0
    for name in videos:
        if ZOO[name].refused:
            continue
        path = root / name
        window = max(0.3, probe_video(path).duration / 3)
        windows = list(iter_windows(path, 3, 24, window))
        assert len(windows) == len(window_spans(probe_video(path).duration, window)), name
        for w in windows:
            reference = load_clip(path, 3, 24, start_sec=w.start, end_sec=w.end)
            assert np.array_equal(w.frames, reference), (name, w.index)
        checked += 1
    assert checked >= 5
