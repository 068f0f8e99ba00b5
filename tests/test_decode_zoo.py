"""The decoding contract on a zoo of real-world kinds of files (pipeline/demo/videozoo.py).

For every file and backend: the frames that come back equal a plain sequential PyAV decode of
the best video stream at the requested frames (exactly: both backends convert with FFmpeg's
swscale; decord is only used where it was checked to match), the reported duration and size
are the file's, and decord either is used or falls back with a counted reason.
"""

import av
import numpy as np
import pytest

from pipeline.demo.videozoo import ZOO_SKIPPED, frame_index, index_frames, make_video_zoo
from pipeline.errors import VideoDecodeError
from pipeline.sampling import sample_frame_indices
from pipeline.video import decode_frames, frame_times, load_clip, probe_video, write_video

BACKENDS = ["pyav", "decord"]
ZOO = make_video_zoo.__globals__["_ZOO"]  # every file the zoo can make, made or skipped
DECODABLE = [name for name, (_, video) in ZOO.items() if not video.refused]
REFUSED = [name for name, (_, video) in ZOO.items() if video.refused]


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
    times, _ = _sequential(path)  # from the first decodable frame on
    ours = frame_times(path)[video.first_decodable :]
    np.testing.assert_allclose(ours - ours[0], times, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DECODABLE)
def test_decoded_frames_equal_a_sequential_decode(zoo, name, backend):
    path, video = _video(zoo, name)
    _, reference = _sequential(path)  # the decodable frames, from first_decodable on
    n, first = video.num_frames, video.first_decodable
    wanted = [
        n - 1,
        first,
        first + (n - first) // 3,
        n - 1,
        first + 2 * (n - first) // 3,
    ]  # unsorted, repeats
    fallbacks: list[str] = []
    frames = decode_frames(path, wanted, backend, fallbacks=fallbacks)
    expected = reference[[k - first for k in wanted]]
    assert frames.shape == expected.shape == (len(wanted), video.height, video.width, 3)
    np.testing.assert_array_equal(frames, expected)
    shown = [frame_index(f, video.rotation) for f in frames]  # the frame shows its index
    assert shown == [k + video.first_shown for k in wanted]
    if backend == "pyav" or not video.decord:
        assert fallbacks == []
    else:
        assert len(fallbacks) == 1 and fallbacks[0].startswith(f"decord: {video.decord}"), fallbacks


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
def test_corrupt_start_decodes_later_frames_and_refuses_lost_ones(zoo, backend):
    path, video = _video(zoo, "corrupt_start.mp4")
    fallbacks: list[str] = []
    with pytest.raises(VideoDecodeError, match=r"could not be decoded, at 0\.000s"):
        decode_frames(path, [0, 20], backend, fallbacks=fallbacks)
    if backend == "pyav":
        assert fallbacks == []
    else:  # decord fails on the corrupt packets; the reason is kept, pyav then names the lost frames
        assert len(fallbacks) == 1 and fallbacks[0].startswith("decord: failed ("), fallbacks
    with pytest.raises(VideoDecodeError, match="could not be decoded"):
        load_clip(path, 4, 16, backend=backend)  # uniform sampling starts at frame 0


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
    import pipeline.video

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
        wanted = sorted(set(rng.integers(video.first_decodable, video.num_frames, size=6).tolist()))
        frames = decode_frames(path, wanted)
        np.testing.assert_array_equal(frames, reference[[k - video.first_decodable for k in wanted]])
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
