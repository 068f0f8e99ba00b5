"""The decoding contract on a zoo of real-world kinds of files (pipeline/demo/videozoo.py).

For every file and backend: the frames that come back equal a plain sequential PyAV decode of
the best video stream at the requested frames (exactly: both backends convert with FFmpeg's
swscale; decord is only used where it was checked to match), the reported duration and size
are the file's, and decord either is used or falls back with a counted reason.
"""

import json
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline.video
from pipeline.config import config_from_dict
from pipeline.demo.testmodels import init_model
from pipeline.demo.videozoo import BOTTOM, HEIGHT, ZOO, ZOO_SKIPPED, frame_index, index_frames, make_video_zoo
from pipeline.errors import VideoDecodeError
from pipeline.sampling import sample_frame_indices
from pipeline.video import (
    decode_frames,
    frame_rgb,
    frame_times,
    index_video,
    iter_frames,
    load_clip,
    probe_video,
    write_video,
)
from stages.caption import caption_videos
from stages.extract import run as extract

BACKENDS = ["pyav", "decord"]
DECODABLE = [name for name, video in ZOO.items() if not video.refused]
REFUSED = [name for name, video in ZOO.items() if video.refused]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return root, make_video_zoo(root)


def _video(zoo, name):
    root, videos = zoo
    if name not in videos:
        pytest.skip(ZOO_SKIPPED[name])
    return root / name, videos[name]


def _sequential(path):
    """Reference: every frame of the best video stream decoded in order with PyAV, ordered by pts
    (by decode output where the container has no presentation times), turned for display:
    (times (N,), frames (N, H, W, 3)). Packets that fail to decode are skipped."""
    with av.open(str(path)) as container:
        stream = container.streams.best("video")
        no_pts = container.format.name == "avi"
        decoded = []
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue
            for frame in frames:
                image = np.rot90(frame.to_ndarray(format="rgb24"), k=(frame.rotation % 360) // 90)
                decoded.append((len(decoded) if no_pts else frame.pts, image))
        base = 1 / float(stream.average_rate) if no_pts else float(stream.time_base)
    decoded.sort(key=lambda item: item[0])
    stamps = np.array([stamp for stamp, _ in decoded], dtype=np.float64)
    return (stamps - stamps[0]) * base, np.stack([image for _, image in decoded])


@pytest.mark.parametrize("name", DECODABLE)
def test_probe_reports_the_files_frames_size_rotation_and_duration(zoo, name):
    path, video = _video(zoo, name)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.rotation) == (
        video.num_frames, video.width, video.height, video.rotation
    )  # fmt: skip
    assert info.duration == pytest.approx(video.duration, abs=2e-3)
    assert info.fps == pytest.approx(video.num_frames / video.duration, rel=2e-3)
    assert info.skipped_frames == video.skipped
    times, _ = _sequential(path)
    np.testing.assert_allclose(frame_times(path), times, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DECODABLE)
def test_decoded_frames_equal_a_sequential_decode(zoo, name, backend):
    path, video = _video(zoo, name)
    _, reference = _sequential(path)
    n = video.num_frames
    wanted = [n - 1, 0, n // 3, n - 1, 2 * n // 3]  # unsorted, with repeats
    fallbacks: list[str] = []
    frames = decode_frames(path, wanted, backend, fallbacks=fallbacks)
    expected = reference[wanted]
    assert frames.shape == expected.shape == (len(wanted), video.height, video.width, 3)
    np.testing.assert_array_equal(frames, expected)
    shown = [frame_index(f, video.rotation) for f in frames]  # the frame shows its index
    assert shown == [k + video.first_shown for k in wanted]
    notes = ["undecodable frames at the start left out"] if video.skipped else []
    if backend == "pyav" or not video.decord:
        assert fallbacks == notes
    else:
        assert fallbacks[:-1] == notes and fallbacks[-1].startswith(f"decord: {video.decord}"), fallbacks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["vfr_vp8.webm", "vfr_vp9.webm"])
def test_variable_frame_rate_is_sampled_in_time(zoo, name, backend):
    """30 fps for 1 s, then 10 fps for 1.5 s: uniform sampling must follow the clock, not the index."""
    path, video = _video(zoo, name)
    ids = [frame_index(f) for f in load_clip(path, 8, 64, backend=backend)]
    shown = frame_times(path)[ids]
    segment_starts = np.arange(8) * video.duration / 8
    # each sampled frame is on screen within one slow frame (0.1 s) of its segment's start
    assert np.all(np.abs(shown - segment_starts) <= 0.1 + 1e-6), (ids, shown.tolist())
    # sampling by index would have taken frames 0, 5, 11, ..., 39: the last at 1.9 s of 2.5 s
    assert shown[-1] >= 2.1 - 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_start_is_left_out_and_counted(zoo, backend):
    """The first 3 packets (keyframe included) are noise: the 10 frames before the next keyframe
    cannot be shown; the video starts at frame 10, and the stage summaries count it."""
    path, video = _video(zoo, "corrupt_start.mp4")
    info = probe_video(path, backend)
    assert (info.skipped_frames, info.num_frames, info.duration) == (10, 30, pytest.approx(1.2))
    fallbacks: list[str] = []
    clip = load_clip(path, 4, 64, backend=backend, fallbacks=fallbacks)
    assert [frame_index(f) for f in clip] == (10 + sample_frame_indices(30, 4)).tolist()
    assert fallbacks[0] == "undecodable frames at the start left out"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", REFUSED)
def test_files_without_video_are_refused_with_the_reason(zoo, name, backend):
    path, video = _video(zoo, name)
    for call in (lambda: probe_video(path, backend), lambda: load_clip(path, 4, 16, backend=backend)):
        with pytest.raises(VideoDecodeError) as caught:
            call()
        assert caught.value.reason.startswith(video.refused)


def test_two_streams_decode_the_best_one_everywhere(zoo):
    path, video = _video(zoo, "two_streams.mp4")
    with av.open(str(path)) as container:
        best = container.streams.best("video")
        size = (best.codec_context.width, best.codec_context.height)
    info = probe_video(path)
    assert (info.width, info.height) == size
    for backend in BACKENDS:
        clip = decode_frames(path, [0, info.num_frames - 1], backend)
        assert clip.shape[1:3] == (size[1], size[0])
        assert [frame_index(f) for f in clip] == [0, info.num_frames - 1]  # not the other stream's 100+


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rot90.mp4", "rot180.mov", "rot270.mp4", "rot90.mov"])
def test_rotated_videos_come_out_upright_for_the_model(zoo, name, backend):
    path, video = _video(zoo, name)
    upright = np.rot90(index_frames(1)[0], k=video.rotation // 90)
    frame = decode_frames(path, [0], backend)[0]
    assert frame.shape == upright.shape
    assert np.abs(frame.astype(int) - upright).mean() < 6


def test_constant_rate_sampling_is_unchanged(tmp_path):
    """At a constant frame rate, time slots are frame indices: caches built before stay valid."""
    for fps, suffix in ((29.97, "mp4"), (8, "webm"), (25, "mkv")):
        path = tmp_path / f"cfr.{suffix}"
        write_video(path, index_frames(17), fps=fps)
        assert [frame_index(f) for f in decode_frames(path, range(17))] == list(range(17))
        assert [frame_index(f) for f in load_clip(path, 7, 64)] == sample_frame_indices(17, 7).tolist()
        assert probe_video(path).duration == pytest.approx(17 / fps, abs=1e-3)


@pytest.mark.parametrize("name", DECODABLE)
def test_seeking_finds_random_frames_exactly(zoo, name, monkeypatch):
    """pyav seeks to the keyframe before each run of wanted frames and recognises frames by pts;
    on files with presentation times it never needs the pass from the start."""
    path, video = _video(zoo, name)
    _, reference = _sequential(path)
    passes = []
    real = pipeline.video._decode

    def spy(index, wanted, threads, frames, errors, seek):
        passes.append(seek)
        real(index, wanted, threads, frames, errors, seek)

    monkeypatch.setattr(pipeline.video, "_decode", spy)
    rng = np.random.default_rng(0)
    for _ in range(6):
        wanted = sorted(set(rng.integers(0, video.num_frames, size=6).tolist()))
        np.testing.assert_array_equal(decode_frames(path, wanted), reference[wanted])
    if name.endswith(".avi"):  # no presentation times: only the pass from the start can place frames
        assert set(passes) == {False}
    else:
        assert set(passes) == {True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_windows_follow_the_clock_on_variable_frame_rate(zoo, backend):
    """A window [1.5 s, 2.5 s) of the 30-then-10 fps file holds the frames shown then (10 fps part)."""
    path, _ = _video(zoo, "vfr_vp9.webm")
    times = frame_times(path)
    ids = [frame_index(f) for f in load_clip(path, 4, 64, backend=backend, start_sec=1.5, end_sec=2.5)]
    assert all(1.5 - 0.1 <= times[k] < 2.5 for k in ids), (ids, times[ids].tolist())
    assert ids == sorted(ids) and len(set(ids)) == 4


@pytest.mark.parametrize("name", DECODABLE)
def test_one_pass_reading_gives_every_frame_once_in_order(zoo, name):
    """iter_frames + frame_rgb (for one-pass readers of long videos) give the sequential decode."""
    path, video = _video(zoo, name)
    _, reference = _sequential(path)
    index = index_video(path)
    indices, frames = zip(*[(k, frame_rgb(f, index)) for k, f in iter_frames(index)], strict=True)
    assert list(indices) == list(range(video.num_frames))
    np.testing.assert_array_equal(np.stack(frames), reference)


def test_a_window_samples_what_load_clip_decodes(zoo):
    path, _ = _video(zoo, "vfr_vp8.webm")
    index = index_video(path)
    for start, end in ((0.0, 1.0), (1.0, 2.0), (2.0, 2.5), (0.4, 0.5)):
        wanted = index.sample(4, start_sec=start, end_sec=end)
        assert [
            frame_index(f) for f in load_clip(path, 4, 64, start_sec=start, end_sec=end)
        ] == wanted.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["h264.mp4", "h264_bt709.mp4"])
def test_colours_follow_the_files_colour_matrix(zoo, name, backend):
    """BOTTOM (200, 40, 40) comes back as itself: read with BT.601, a BT.709 file's red would be (185, 23, 41)."""
    path, _ = _video(zoo, name)
    bottom = decode_frames(path, [0], backend)[0, HEIGHT // 2 + 4 :, 4:-4].reshape(-1, 3).mean(0)
    assert np.abs(bottom - BOTTOM).max() < 4, bottom


def test_extract_and_caption_summaries_count_decord_fallbacks(zoo, tmp_path):
    """Stages with `decode.backend: decord`: every zoo video where decord is not exact is decoded by
    pyav and counted by reason, as is a start left out; the audio-only file fails, the others are done."""
    root, videos = zoo
    names = [
        "h264.mp4",
        "h264_bframes.avi",
        "two_streams.mp4",
        "rot90.mp4",
        "corrupt_start.mp4",
        "audio_only.m4a",
    ]
    rows = [
        {"video_id": Path(n).stem, "video": n, "split": "test", "captions": ["a bar code"]} for n in names
    ]
    annotations = tmp_path / "zoo.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = init_model(tmp_path / "tiny", "tiny-t5", vocab_from=annotations, seed=0)
    config = config_from_dict({
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
        "data": {"annotations": str(annotations), "video_root": str(root)},
        "decode": {"backend": "decord"},
        "model": {"pretrained": str(model), "num_frames": 4, "image_size": 32},
        "cache": {"path": str(tmp_path / "cache.zarr"), "train_views": 0},
        "extract": {"batch_size": 2, "decode_workers": 1},
        "caption": {"batch_size": 2, "num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 1},
    })  # fmt: skip
    expected = {
        "decord: no presentation times (avi)": 1,
        "decord: several video streams": 1,
        "decord: rotated 90 degrees (decord's batches of rotated frames fail)": 1,
        "undecodable frames at the start left out": 1,
        "decord: its frame count differs from the stream's": 1,
    }
    summary = extract(config)
    assert (summary["done"], summary["failed"]) == (5, 1)
    assert summary["decode_fallbacks"] == expected
    inputs = [str(root / n) for n in names]
    captioned = caption_videos(inputs, str(model), str(tmp_path / "captions.jsonl"), config)
    assert (captioned["captioned"], captioned["errors"]) == (5, 1)
    assert captioned["decode_fallbacks"] == expected


def _realistic_clip(path, codec: str, options: dict[str, str]) -> None:
    """15 s of 320x240 at 30 fps: a pan over noise, inverted every 70 frames (scene cuts that
    make encoders place keyframes off their regular interval)."""
    texture = np.random.default_rng(0).integers(0, 256, size=(540, 620, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt, stream.options = 320, 240, "yuv420p", options
        for k in range(450):
            image = np.ascontiguousarray(texture[(2 * k) % 300 :][:240, (3 * k) % 300 :][:, :320])
            image = 255 - image if (k // 70) % 2 else image
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, codec, options",
    [
        ("x264.mp4", "libx264", {"preset": "veryfast"}),
        ("x264_open_gop.mkv", "libx264", {"preset": "veryfast", "x264-params": "open-gop=1:keyint=60"}),
        ("x265.mp4", "libx265", {"preset": "ultrafast", "x265-params": "log-level=error:keyint=60"}),
        ("vp9.webm", "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "g": "60"}),
    ],
)
def test_random_access_on_realistic_clips_is_exact(tmp_path, name, codec, options):
    """MSR-VTT-sized clips with real motion and scene cuts: random sets of frames, both backends,
    equal the sequential decode pixel for pixel."""
    path = tmp_path / name
    _realistic_clip(path, codec, options)
    index = index_video(path)
    assert index.info.num_frames == 450 and len(index.keys) > 2  # seeking is exercised
    _, reference = _sequential(path)
    rng = np.random.default_rng(1)
    for _ in range(12):
        wanted = sorted(set(rng.integers(0, 450, size=rng.integers(1, 17)).tolist()))
        for backend in BACKENDS:
            np.testing.assert_array_equal(decode_frames(path, wanted, backend), reference[wanted])
