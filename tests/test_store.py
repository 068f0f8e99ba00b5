"""The feature store: layout, fingerprint checks, done/failed tracking, concurrent writers, SIGKILL."""

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from cache import CODECS, FeatureStore, FingerprintMismatch, StoreError

SHAPE = (2, 3, 5, 8)  # (V, T, L, D) of one video
FINGERPRINT = {"vit_sha256": "ab12", "model_id": "tiny-blip2", "num_frames": 3, "image_size": 32, "seed": 0}
IDS = [f"video{i}" for i in range(6)]


def _tokens(index, shape=SHAPE):
    """Deterministic per-video data, so a reader can tell which video a chunk came from."""
    return np.random.default_rng(index).standard_normal(shape).astype(np.float32) * 3


def _create(path, ids=IDS, shape=SHAPE, fingerprint=FINGERPRINT, **kw):
    return FeatureStore.create(path, ids, *shape, fingerprint=fingerprint, **kw)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_every_codec(tmp_path, codec):
    store = _create(tmp_path / "f.zarr", codec=codec)
    for i, video_id in enumerate(IDS[:4]):
        store.write_video(video_id, _tokens(i))
    again = FeatureStore.open(tmp_path / "f.zarr", FINGERPRINT)
    got = again.read(IDS[:4], views=[0, 1, 1, 0])
    assert got.dtype == np.float16 and got.shape == (4, *SHAPE[1:])
    for b, view in enumerate([0, 1, 1, 0]):
        np.testing.assert_array_equal(got[b], _tokens(b)[view].astype(np.float16))
    np.testing.assert_array_equal(again.read([3, 0], views=1)[1], _tokens(0)[1].astype(np.float16))
    assert again.info()["codec"] == {"name": codec, "level": 3}


def test_torch_tensors_in_any_float_dtype_are_cast(tmp_path):
    torch = pytest.importorskip("torch")
    store = _create(tmp_path / "f.zarr")
    data = torch.from_numpy(_tokens(0)).to(torch.bfloat16)
    store.write_video(IDS[0], data)
    np.testing.assert_array_equal(store.read(IDS[0], views=1)[0], data[1].to(torch.float16).numpy())
    with pytest.raises(ValueError, match="shape"):
        store.write_video(IDS[1], _tokens(1, (1, 3, 5, 8)))
    with pytest.raises(ValueError, match="not finite"):
        store.write_video(IDS[1], _tokens(1) * 1e6)  # overflows float16


def test_layout_is_readable_with_plain_zarr(tmp_path):
    store = _create(tmp_path / "f.zarr")
    store.write_video(IDS[2], _tokens(2))
    group = zarr.open_group(tmp_path / "f.zarr", mode="r")
    tokens = group["tokens"]
    assert tokens.shape == (6, *SHAPE) and tokens.dtype == np.float16 and tokens.chunks == (1, 1, 3, 5, 8)
    np.testing.assert_array_equal(tokens[2, 1], _tokens(2)[1].astype(np.float16))
    assert group["video_ids"][:].tolist() == IDS
    assert group.attrs["format_version"] == 1 and group.attrs["fingerprint"] == FINGERPRINT
    assert group.attrs["shape"] == {"videos": 6, "views": 2, "frames": 3, "tokens_per_frame": 5, "width": 8}
    assert sorted(os.listdir(tmp_path / "f.zarr/status/done")) == ["2"]


def test_fingerprint_mismatch_names_each_differing_key(tmp_path):
    _create(tmp_path / "f.zarr", fingerprint={**FINGERPRINT, "num_frames": 8, "views": (0, 1)})
    FeatureStore.open(tmp_path / "f.zarr", {**FINGERPRINT, "num_frames": 8, "views": [0, 1]})  # tuple == list
    with pytest.raises(FingerprintMismatch) as err:
        FeatureStore.open(
            tmp_path / "f.zarr", {**FINGERPRINT, "num_frames": 16, "views": [0, 1], "dtype": "fp16"}
        )
    message = str(err.value)
    assert "num_frames: cache 8, config 16" in message and "dtype: cache <missing>, config 'fp16'" in message
    assert "model_id" not in message and err.value.differences == [
        "dtype: cache <missing>, config 'fp16'",
        "num_frames: cache 8, config 16",
    ]


def test_open_or_create_resumes_only_the_same_store(tmp_path):
    path = tmp_path / "f.zarr"
    store = FeatureStore.open_or_create(path, IDS, *SHAPE, fingerprint=FINGERPRINT)
    store.write_video(IDS[0], _tokens(0))
    resumed = FeatureStore.open_or_create(path, IDS, *SHAPE, fingerprint=FINGERPRINT)
    assert resumed.done_ids() == {IDS[0]} and resumed.pending_ids() == IDS[1:]
    with pytest.raises(StoreError, match="first difference at index 1: store 'video1', manifest 'other'"):
        FeatureStore.open_or_create(path, [IDS[0], "other", *IDS[2:]], *SHAPE, fingerprint=FINGERPRINT)
    with pytest.raises(StoreError, match="the store has 6 videos, the manifest 5"):
        FeatureStore.open_or_create(path, IDS[:5], *SHAPE, fingerprint=FINGERPRINT)
    with pytest.raises(FingerprintMismatch, match="seed: cache 0, config 1"):
        FeatureStore.open_or_create(path, IDS, *SHAPE, fingerprint={**FINGERPRINT, "seed": 1})
    with pytest.raises(FingerprintMismatch, match="frames: cache 3, config 4"):
        FeatureStore.open_or_create(path, IDS, 2, 4, 5, 8, fingerprint=FINGERPRINT)
    fresh = FeatureStore.open_or_create(path, IDS[:2], *SHAPE, fingerprint=FINGERPRINT, overwrite=True)
    assert fresh.video_ids == IDS[:2] and fresh.done_ids() == set()


def test_create_refuses_an_existing_store_and_open_a_missing_one(tmp_path):
    _create(tmp_path / "f.zarr")
    with pytest.raises(StoreError, match="already exists"):
        _create(tmp_path / "f.zarr")
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="unique"):
        _create(tmp_path / "g.zarr", ids=["a", "b", "a"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no leftover temporary folders


def test_done_and_failed_tracking(tmp_path):
    store = _create(tmp_path / "f.zarr")
    store.write_video(IDS[0], _tokens(0))
    store.mark_failed(IDS[1], "cannot decode: moov atom not found")
    store.mark_failed(IDS[2], "too short")
    assert store.done_ids() == {IDS[0]}
    assert store.failed() == {IDS[1]: "cannot decode: moov atom not found", IDS[2]: "too short"}
    assert store.pending_ids() == IDS[3:]  # failed ones are not retried by default
    assert store.pending_ids(retry_failed=True) == IDS[1:]
    store.write_video(IDS[1], _tokens(1))  # a later success clears the failure
    assert store.failed() == {IDS[2]: "too short"} and store.done_ids() == {IDS[0], IDS[1]}
    assert not (tmp_path / "f.zarr/status/failed/1.json").exists()
    info = store.info()
    assert (info["videos"], info["done"], info["pending"]) == (6, 2, 3)
    assert info["failed"] == {IDS[2]: "too short"} and info["fingerprint"] == FINGERPRINT
    assert info["shape"]["width"] == 8 and info["raw_bytes_done"] == 2 * 2 * 3 * 5 * 8 * 2
    before = info["bytes"]
    store.write_video(IDS[3], _tokens(3))
    assert store.info()["bytes"] > before > 0


def test_chunks_without_done_marker_do_not_count(tmp_path):
    store = _create(tmp_path / "f.zarr")
    store.tokens[4] = _tokens(4).astype(np.float16)  # killed after the chunks, before the marker
    (tmp_path / "f.zarr/status/done/.3.abc.tmp").write_bytes(b"")  # killed mid-way through a marker
    assert store.done_ids() == set() and IDS[4] in store.pending_ids() and IDS[3] in store.pending_ids()
    store.write_video(IDS[0], _tokens(0))
    with pytest.raises(StoreError, match=r"not done in .*f.zarr: 'video4' \(index 4\)$"):
        store.read([IDS[0], IDS[4]])
    store.write_video(IDS[4], _tokens(4))
    assert store.done_ids() == {IDS[0], IDS[4]}


def test_read_only_store_and_bad_arguments(tmp_path):
    _create(tmp_path / "f.zarr").write_video(IDS[0], _tokens(0))
    store = FeatureStore.open(tmp_path / "f.zarr")
    with pytest.raises(StoreError, match="read-only"):
        store.write_video(IDS[1], _tokens(1))
    with pytest.raises(KeyError, match="nope"):
        store.read(["nope"])
    with pytest.raises(IndexError, match=r"views \[2\] out of range"):
        store.read([IDS[0]], views=2)
    with pytest.raises(ValueError, match="2 views for 1 videos"):
        store.read([IDS[0]], views=[0, 1])


def test_pickles_as_its_path(tmp_path):
    store = _create(tmp_path / "f.zarr")
    store.write_video(IDS[0], _tokens(0))
    assert len(pickle.dumps(store)) < 300  # no arrays, no ids: workers re-open lazily
    copy = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(copy.read([0])[0], _tokens(0)[0].astype(np.float16))


def _write_every(store, start, step):
    for i in range(start, len(store.video_ids), step):
        store.write_video(store.video_ids[i], _tokens(i))


def test_concurrent_writers_of_different_videos(tmp_path):
    ids = [f"v{i}" for i in range(16)]
    store = _create(tmp_path / "f.zarr", ids=ids)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like processes on other machines
    workers = [ctx.Process(target=_write_every, args=(store, k, 2)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert store.done_ids() == set(ids) and store.pending_ids() == []
    got = store.read(ids, views=1)
    for i in range(len(ids)):
        np.testing.assert_array_equal(got[i], _tokens(i)[1].astype(np.float16))


KILLED_WRITER = """
import numpy as np
from cache import FeatureStore

def _tokens(index, shape):
    return np.random.default_rng(index).standard_normal(shape).astype(np.float32) * 3

store = FeatureStore.open({path!r}, mode="r+")
for video_id in store.pending_ids():
    store.write_video(video_id, _tokens(store.index_of(video_id), {shape!r}))
    print(video_id, flush=True)
"""


def test_sigkill_mid_run_leaves_a_consistent_store(tmp_path):
    shape = (2, 4, 64, 256)  # 128 KiB per chunk: a kill often lands inside a write
    ids = [f"v{i}" for i in range(400)]
    path = tmp_path / "f.zarr"
    _create(path, ids=ids, shape=shape, codec="zstd")
    script = KILLED_WRITER.format(path=str(path), shape=shape)
    rng = np.random.default_rng(0)
    for _ in range(2):  # two kills at random instants after the writer got going
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3):
            assert writer.stdout.readline(), "the writer died before writing 3 videos"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
        assert writer.returncode == -signal.SIGKILL
    store = FeatureStore.open(path, fingerprint=FINGERPRINT, mode="r+")
    done = sorted(store.index_of(v) for v in store.done_ids())
    assert 6 <= len(done) < len(ids)
    for index in done:  # every video reported done reads back exactly its own content
        np.testing.assert_array_equal(
            store.read([index], views=1)[0], _tokens(index, shape)[1].astype(np.float16)
        )
    pending = store.pending_ids()
    assert len(pending) == len(ids) - len(done)
    for video_id in pending[:20]:  # the rest can be written
        store.write_video(video_id, _tokens(store.index_of(video_id), shape))
    assert len(store.done_ids()) == len(done) + 20


# ---------------------------------------------------------------------------------------
# The store proves what it serves: checksums in the done markers
# ---------------------------------------------------------------------------------------


def test_done_markers_hold_each_chunks_size_and_crc(tmp_path):
    import json
    import zlib

    store = _create(tmp_path / "f.zarr")
    store.write_video(IDS[1], _tokens(1))
    store.write_video(IDS[2], np.zeros(SHAPE, np.float32))  # zarr stores no all-zero chunk
    marker = json.loads((tmp_path / "f.zarr/status/done/1").read_text())
    chunk = (tmp_path / "f.zarr/tokens/c/1/1/0/0/0").read_bytes()
    assert marker["video_id"] == IDS[1] and marker["chunks"][1] == [len(chunk), zlib.crc32(chunk)]
    assert json.loads((tmp_path / "f.zarr/status/done/2").read_text())["chunks"] == [None, None]
    np.testing.assert_array_equal(store.read([IDS[2]])[0], np.zeros(SHAPE[1:], np.float16))  # legit zeros
    assert store.verify() == {"checked": 2, "damaged": {}, "repaired": False}


def test_a_damaged_chunk_is_an_error_naming_the_video_never_zeros(tmp_path):
    store = _create(tmp_path / "f.zarr")
    for i in range(3):
        store.write_video(IDS[i], _tokens(i))
    (tmp_path / "f.zarr/tokens/c/0/1/0/0/0").unlink()  # deleted
    flipped = tmp_path / "f.zarr/tokens/c/1/0/0/0/0"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"video 'video0' \(index 0\) is marked done .* view 1 .* missing"):
        store.read([IDS[2], IDS[0]], views=1)
    with pytest.raises(StoreError, match=r"video 'video1' .* corrupt \(CRC-32"):
        store.read([IDS[1]])
    np.testing.assert_array_equal(store.read([IDS[0]], views=0)[0], _tokens(0)[0].astype(np.float16))
    report = FeatureStore.open(tmp_path / "f.zarr").verify()
    assert report["checked"] == 3 and sorted(report["damaged"]) == [IDS[0], IDS[1]]
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(tmp_path / "f.zarr").verify(repair=True)
    assert store.verify(repair=True)["repaired"]
    assert store.pending_ids() == [IDS[0], IDS[1], *IDS[3:]] and store.verify()["damaged"] == {}


def test_an_older_stores_marker_without_checksums_still_reads_and_a_bad_chunk_names_the_video(tmp_path):
    shape = (1, 4, 64, 256)  # large enough for blosc to compress (tiny chunks are stored as they are)
    store = _create(tmp_path / "f.zarr", shape=shape, codec="blosc-zstd")
    store.write_video(IDS[0], _tokens(0, shape))
    (tmp_path / "f.zarr/status/done/0").write_text(IDS[0])  # format of an older vidcap: the id only
    np.testing.assert_array_equal(store.read([IDS[0]])[0], _tokens(0, shape)[0].astype(np.float16))
    chunk = tmp_path / "f.zarr/tokens/c/0/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:50])  # truncated: blosc cannot decode it
    with pytest.raises(StoreError, match=r"video 'video0' .* cannot be decoded"):
        store.read([IDS[0]])
    assert list(store.verify()["damaged"]) == [IDS[0]]


def test_overwrite_replaces_only_a_feature_store(tmp_path):
    from cache.store import is_feature_store

    theirs = tmp_path / "data"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    (theirs / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    assert not is_feature_store(theirs) and is_feature_store(_create(tmp_path / "f.zarr").path)
    with pytest.raises(StoreError, match="not a vidcap feature store"):
        _create(theirs, overwrite=True)
    assert (theirs / "keep.txt").read_text() == "x"
    _create(tmp_path / "f.zarr", overwrite=True)  # ours: replaced


@pytest.mark.parametrize("metadata", ["zarr.json", "tokens/zarr.json", "video_ids/zarr.json"])
def test_a_torn_zarr_json_is_one_error_naming_the_store(tmp_path, metadata):
    path = tmp_path / "f.zarr"
    _create(path)
    torn = path / metadata
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # cut mid-write by something else
    with pytest.raises(StoreError, match="damaged Zarr metadata") as error:
        store = FeatureStore.open(path)
        store.video_ids  # noqa: B018 (read lazily)
    assert str(path) in str(error.value)
