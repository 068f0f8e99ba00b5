"""Decoding real (tiny) videos with both backends, failure modes, and clip loading."""

import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.sampling import random_resized_crop_params, sample_frame_indices, view_rng
from pipeline.video import (
    VideoDecodeError,
    decode_frames,
    load_clip,
    load_views,
    probe_video,
    write_video,
)

BACKENDS = ["decord", "pyav"]
FPS = 8
# Name -> (frames, height, width). Every frame is one flat colour from PALETTE, so a
# decoded frame tells which frame it is.
VIDEOS = {
    "clip.mp4": (12, 48, 64),
    "clip.webm": (12, 48, 64),
    "clip.avi": (12, 48, 64),
    "clip.mkv": (12, 48, 64),
    "one.mp4": (1, 48, 64),
    "three.webm": (3, 48, 64),
    "odd.mp4": (10, 33, 47),
    "odd.mkv": (10, 33, 47),
    "odd.webm": (10, 33, 47),
    "long.mp4": (20, 48, 64),
}


def _palette(n: int) -> np.ndarray:
    """n colours of a 4x4x4 grid (levels 60 apart), shuffled so that neighbours differ."""
    levels = np.array([40, 100, 160, 220])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    return grid[np.random.default_rng(7).permutation(len(grid))[:n]]


PALETTE = _palette(20)


def _flat_frames(n: int, height: int, width: int) -> np.ndarray:
    return np.broadcast_to(PALETTE[:n, None, None, :], (n, height, width, 3)).astype(np.uint8)


def _noisy_frames(n: int, height: int, width: int) -> np.ndarray:
    """Palette colours plus noise: big frames, so a cut file still holds whole ones."""
    noise = np.random.default_rng(0).integers(-20, 21, size=(n, height, width, 3))
    return np.clip(_flat_frames(n, height, width) + noise, 0, 255).astype(np.uint8)


def _frame_ids(frames: np.ndarray, max_error: float = 8.0, flat: bool = True) -> list[int]:
    """Which palette colour each decoded frame shows; fails if a frame is not (near) one colour."""
    means = frames.reshape(len(frames), -1, 3).mean(1)  # (N, 3)
    ids = np.abs(means[:, None] - PALETTE[None]).max(-1).argmin(1)
    assert np.abs(means - PALETTE[ids]).max() < max_error
    spread = np.abs(frames.astype(float) - means[:, None, None]).mean()
    assert spread < 4.0 or not flat, f"frames are not flat (mean deviation {spread:.1f})"
    return ids.tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for name, shape in VIDEOS.items():
        write_video(root / name, _flat_frames(*shape), fps=FPS)
    # A left-to-right ramp: crops and flips change it visibly.
    ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None], (16, 48, 64, 3))
    write_video(root / "ramp.mp4", ramp.copy(), fps=FPS)
    for ext in ("mp4", "mkv", "webm", "avi"):
        write_video(root / f"noisy.{ext}", _noisy_frames(20, 48, 64), fps=FPS)
    return root


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VIDEOS))
def test_decode_returns_the_written_frames(videos, name, backend):
    n, height, width = VIDEOS[name]
    info = probe_video(videos / name, backend)
    assert (info.num_frames, info.height, info.width) == (n, height, width)
    assert info.fps == pytest.approx(FPS)
    assert info.duration == pytest.approx(n / FPS)
    indices = [n - 1, 0, n // 2, n - 1, 0]  # unsorted, with repeats
    frames = decode_frames(videos / name, indices, backend)
    assert frames.dtype == np.uint8 and frames.shape == (5, height, width, 3)
    assert _frame_ids(frames) == indices


@pytest.mark.parametrize("name", list(VIDEOS))
def test_backends_agree(videos, name):
    n = VIDEOS[name][0]
    indices = list(range(n))[::-1]
    a = decode_frames(videos / name, indices, "decord").astype(float)
    b = decode_frames(videos / name, indices, "pyav").astype(float)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_past_the_end_is_a_decode_error(videos, backend):
    with pytest.raises(VideoDecodeError, match="frame 12"):
        decode_frames(videos / "clip.mp4", [0, 12], backend)
    with pytest.raises(ValueError, match=">= 0"):
        decode_frames(videos / "clip.mp4", [-1], backend)


def test_empty_index_list(videos):
    assert decode_frames(videos / "clip.mp4", [], "pyav").shape == (0, 48, 64, 3)


# ---------------------------------------------------------------------------------------
# Broken inputs: always VideoDecodeError naming the file, never another exception type.
# ---------------------------------------------------------------------------------------


def _make_broken(kind: str, root, videos):
    path = root / f"{kind}.mp4"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(20_000))
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "png":
        path = root / "image.png"
        Image.fromarray(_flat_frames(1, 48, 64)[0]).save(path)
    elif kind == "zero_frames":
        path = root / "zero.avi"
        write_video(path, np.zeros((0, 48, 64, 3), dtype=np.uint8))
        assert path.stat().st_size > 0  # the container exists, with a stream and no frames
    elif kind == "directory":
        path.mkdir()
    return path


BROKEN = ["missing", "empty", "random_bytes", "text", "png", "zero_frames", "directory"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BROKEN)
def test_broken_files_raise_video_decode_error(tmp_path, videos, kind, backend):
    path = _make_broken(kind, tmp_path, videos)
    calls = [
        lambda: probe_video(path, backend),
        lambda: decode_frames(path, [0], backend),
        lambda: load_clip(path, 4, 16, backend=backend),
    ]
    for call in calls:
        with pytest.raises(Exception) as caught:
            call()
        assert type(caught.value) is VideoDecodeError
        assert caught.value.path == str(path)
        assert str(caught.value).startswith(f"{path}: ") and caught.value.reason


def _cut(source, path, fraction: float):
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name", ["clip.mp4", "clip.webm", "noisy.mp4", "noisy.mkv", "noisy.webm", "noisy.avi"]
)
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_truncated_file_decodes_fewer_frames_or_raises(tmp_path, videos, name, backend, fraction):
    path = _cut(videos / name, tmp_path / name, fraction)
    try:
        info = probe_video(path, backend)
        frames = decode_frames(path, range(info.num_frames), backend)
    except VideoDecodeError as e:
        assert e.path == str(path)
        return
    assert 1 <= info.num_frames < VIDEOS.get(name, (20,))[0]
    # The last packet may itself be cut: the decoder then conceals, so skip that frame.
    assert _frame_ids(frames[:-1], max_error=12, flat=False) == list(range(info.num_frames - 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matroska_cut_in_half_keeps_its_first_frames(tmp_path, videos, backend):
    path = _cut(videos / "noisy.mkv", tmp_path / "half.mkv", 0.5)
    info = probe_video(path, backend)
    assert 3 <= info.num_frames < 20
    frames = decode_frames(path, range(info.num_frames), backend)
    assert _frame_ids(frames[:-1], max_error=12, flat=False) == list(range(info.num_frames - 1))
    assert load_clip(path, 8, 16, backend=backend).shape == (8, 16, 16, 3)


def test_mp4_cut_before_its_index_is_a_decode_error(tmp_path, videos):
    data = (videos / "clip.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.3)])
    for backend in BACKENDS:
        with pytest.raises(VideoDecodeError, match="cut.mp4"):
            probe_video(path, backend)


def test_video_decode_error_pickles():
    error = pickle.loads(pickle.dumps(VideoDecodeError("/a/b.mp4", "no frames")))
    assert (error.path, error.reason, str(error)) == ("/a/b.mp4", "no frames", "/a/b.mp4: no frames")


# ---------------------------------------------------------------------------------------
# load_clip
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["clip.mp4", "one.mp4", "three.webm", "odd.mkv"])
def test_view_zero_is_uniform_whole_frames(videos, name, backend):
    n = VIDEOS[name][0]
    clip = load_clip(videos / name, num_frames=8, image_size=24, view=0, backend=backend)
    assert clip.shape == (8, 24, 24, 3) and clip.dtype == np.uint8
    assert _frame_ids(clip) == sample_frame_indices(n, 8).tolist()


def test_view_zero_resizes_the_whole_frame_bicubic(videos):
    frame = decode_frames(videos / "ramp.mp4", [0], "pyav")[0]
    expected = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BICUBIC))
    clip = load_clip(videos / "ramp.mp4", num_frames=4, image_size=32, view=0, backend="pyav")
    np.testing.assert_array_equal(clip[0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_views_are_deterministic_and_distinct(videos, backend):
    path = videos / "ramp.mp4"
    kwargs = {"num_frames": 4, "image_size": 32, "seed": 3, "video_id": "ramp", "backend": backend}
    view1 = load_clip(path, view=1, **kwargs)
    assert view1.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(view1, load_clip(path, view=1, **kwargs))
    assert not np.array_equal(view1, load_clip(path, view=2, **kwargs))
    assert not np.array_equal(view1, load_clip(path, view=0, **kwargs))
    assert not np.array_equal(view1, load_clip(path, view=1, **{**kwargs, "video_id": "other"}))


def test_training_view_indices_are_headtail(videos):
    kwargs = {"num_frames": 4, "image_size": 16, "seed": 0, "video_id": "long"}
    for view in (1, 2, 3):
        ids = _frame_ids(load_clip(videos / "long.mp4", view=view, **kwargs))
        assert ids == sorted(ids)
        assert sum(i < 10 for i in ids) == 2 and len(set(ids)) == 4  # two from each half


@pytest.mark.parametrize("view", [1, 2, 3])
def test_training_view_is_one_crop_and_flip_drawn_from_view_rng(videos, view):
    """Indices, then crop, then flip, all from view_rng: the documented order the cache relies on."""
    rng = view_rng(5, "ramp", view)
    sample_frame_indices(16, 4, "headtail", rng)
    top, left, h, w = random_resized_crop_params(48, 64, rng)
    flip = rng.random() < 0.5
    frame = decode_frames(videos / "ramp.mp4", [0], "pyav")[0]
    box = (left, top, left + w, top + h)
    expected = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BICUBIC, box=box))
    expected = expected[:, ::-1] if flip else expected
    clip = load_clip(videos / "ramp.mp4", 4, 32, view=view, seed=5, video_id="ramp", backend="pyav")
    for image in clip:  # every frame of the ramp is the same, so every frame gets the same crop
        np.testing.assert_array_equal(image, expected)


def test_training_views_flip_whole_clips(videos):
    """The ramp rises left to right; a flipped clip falls. Both must occur, never mixed."""
    orientations = set()
    for view in range(1, 9):
        clip = load_clip(videos / "ramp.mp4", 4, 32, view=view, video_id="ramp").astype(float)
        rising = clip[:, :, -1].mean(axis=(1, 2)) > clip[:, :, 0].mean(axis=(1, 2))  # per frame
        assert rising.all() or not rising.any()
        orientations.add(bool(rising[0]))
    assert orientations == {True, False}


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_views_is_load_clip_per_view(videos, backend):
    kwargs = {"seed": 1, "video_id": "long", "backend": backend}
    views = load_views(videos / "long.mp4", 4, 16, views=[0, 2, 1], **kwargs)
    assert views.shape == (3, 4, 16, 16, 3)
    for clip, view in zip(views, [0, 2, 1], strict=True):
        np.testing.assert_array_equal(clip, load_clip(videos / "long.mp4", 4, 16, view=view, **kwargs))
    with pytest.raises(ValueError, match="views"):
        load_views(videos / "long.mp4", 4, 16, views=[])


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_window(videos, backend):
    path = videos / "long.mp4"  # 20 frames at 8 fps: 2.5 s
    clip = load_clip(path, 4, 16, view=0, backend=backend, start_sec=1.0, end_sec=2.0)
    assert _frame_ids(clip) == [8, 10, 12, 14]
    tail = load_clip(path, 4, 16, view=0, backend=backend, start_sec=2.0)
    assert _frame_ids(tail) == [16, 17, 18, 19]
    with pytest.raises(VideoDecodeError, match="after the end"):
        load_clip(path, 4, 16, backend=backend, start_sec=3.0, end_sec=4.0)
    with pytest.raises(ValueError, match="empty"):
        load_clip(path, 4, 16, backend=backend, start_sec=1.0, end_sec=1.0)


def test_write_video_takes_fractional_fps(tmp_path):
    write_video(tmp_path / "ntsc.mp4", _flat_frames(3, 48, 64), fps=29.97)
    assert probe_video(tmp_path / "ntsc.mp4", "pyav").fps == pytest.approx(29.97, abs=1e-3)
