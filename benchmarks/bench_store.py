"""Feature store benchmark: bytes per video, write time and batch read rate for each codec.

    python benchmarks/bench_store.py                 # paper shapes (T=8, 16) + a tiny one, 40 videos per codec
    python benchmarks/bench_store.py --videos 16 --shapes tiny,t8

Random normal float16 compresses differently from real ViT tokens, so the default data mimics
EVA ViT-g's post-layernorm output: per-channel gain and bias (the layer norm's affine, with a
few large outlier channels), a spatially smooth patch field over the 16x16 grid, and strong
frame-to-frame correlation (AR(1), rho 0.9), each token normalised over its width. The table
also shows one video of plain random normal data, for contrast. Reads hit the page cache (the
store was just written), so they measure decoding, not the disk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cache.store import CODECS, FeatureStore

SHAPES = {"tiny": (4, 5, 32), "t8": (8, 257, 1408), "t16": (16, 257, 1408)}  # (T, L, D)
CODEC_RUNS = "zstd:3,zstd:9,lz4:1,blosc-zstd:1,blosc-zstd:3,blosc-lz4:5,none:0"  # name:level
UNIQUE_VIDEOS = 4  # distinct token tensors, cycled over the videos (chunks compress independently)


def vit_like_tokens(rng: np.random.Generator, frames: int, length: int, width: int) -> np.ndarray:
    """Plausible post-layernorm ViT tokens (1, T, L, D) float16, smooth in space and time."""
    gain = rng.lognormal(0.0, 0.4, width)
    gain[rng.choice(width, max(1, width // 350), replace=False)] *= 15.0  # outlier channels
    bias = rng.normal(0.0, 0.3, width)
    grid = int(np.sqrt(length - 1)) if length > 1 else 0
    frame = _smooth_field(rng, length, grid, width)
    out = np.empty((frames, length, width), np.float32)
    for t in range(frames):
        frame = 0.9 * frame + np.sqrt(1 - 0.9**2) * _smooth_field(rng, length, grid, width)
        normed = (frame - frame.mean(-1, keepdims=True)) / frame.std(-1, keepdims=True)
        out[t] = normed * gain + bias
    return out[None].astype(np.float16)


def _smooth_field(rng: np.random.Generator, length: int, grid: int, width: int) -> np.ndarray:
    field = rng.standard_normal((length, width)).astype(np.float32) * 0.5  # per-token detail
    if grid >= 4 and grid * grid == length - 1:
        coarse = rng.standard_normal((4, 4, width)).astype(np.float32)
        up = np.repeat(np.repeat(coarse, grid // 4, 0), grid // 4, 1)  # (grid, grid, D) blocky
        up = (up + np.roll(up, 1, 0) + np.roll(up, 1, 1) + np.roll(up, (1, 1), (0, 1))) / 4  # soften edges
        field[1:] += up.reshape(-1, width)
    return field


def compressed_size(root: Path, codec: str, level: int, tokens: np.ndarray) -> int:
    """Bytes of one chunk of `tokens` (1, T, L, D) under `codec`."""
    store = FeatureStore.create(
        root / "one.zarr", ["x"], 1, *tokens.shape[1:], {}, codec=codec, level=level, overwrite=True
    )
    store.write_video("x", tokens)
    return (store.path / "tokens" / store.tokens.metadata.encode_chunk_key((0, 0, 0, 0, 0))).stat().st_size


def bench_codec(
    root: Path,
    codec: str,
    level: int,
    shape: tuple[int, int, int],
    data: list[np.ndarray],
    videos: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    frames, length, width = shape
    ids = [f"video{i:05d}" for i in range(videos)]
    store = FeatureStore.create(
        root / f"{codec}.zarr", ids, 1, frames, length, width, {"bench": True}, codec=codec, level=level
    )
    start = time.perf_counter()
    for i, video_id in enumerate(ids):
        store.write_video(video_id, data[i % len(data)])
    write_s = (time.perf_counter() - start) / videos
    chunk_bytes = store.info()["bytes"] - _metadata_bytes(store)
    result = {"bytes": chunk_bytes / videos, "write_ms": write_s * 1e3}
    for batch in (8, 64):
        reads, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0 or reads < 2:
            got = store.read(rng.integers(0, videos, batch).tolist())
            reads += 1
        result[f"read{batch}"] = reads * batch / (time.perf_counter() - start)
    assert np.array_equal(got[0].shape, shape)
    shutil.rmtree(store.path)
    return result


def _metadata_bytes(store: FeatureStore) -> int:
    meta = [store.path / "zarr.json", store.path / "tokens" / "zarr.json"]
    meta += list((store.path / "video_ids").rglob("*")) + list((store.path / "status").rglob("*"))
    return sum(p.stat().st_size for p in meta if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=40, help="videos written per codec and shape")
    parser.add_argument("--shapes", default="tiny,t8,t16", help=f"comma-separated of {', '.join(SHAPES)}")
    parser.add_argument(
        "--codecs", default=CODEC_RUNS, help=f"comma-separated name:level, names from {CODECS}"
    )
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    try:
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            data = [vit_like_tokens(rng, *shape) for _ in range(UNIQUE_VIDEOS)]
            noise = rng.standard_normal((1, *shape)).astype(np.float16)
            raw = data[0].nbytes
            print(
                f"\n{name}: T={shape[0]} L={shape[1]} D={shape[2]}, 1 view, raw {raw / 1e6:.3f} MB/video, "
                f"{args.videos} videos"
            )
            print(
                f"{'codec:level':<13} {'MB/video':>9} {'ratio':>6} {'normal':>7} {'write ms':>9} {'write MB/s':>10} "
                f"{'read8 v/s':>10} {'read64 v/s':>11} {'read64 MB/s':>12}"
            )
            for run in args.codecs.split(","):
                codec, level = run.split(":")
                r = bench_codec(root, codec, int(level), shape, data, args.videos, rng)
                normal_ratio = compressed_size(root, codec, int(level), noise) / raw
                print(
                    f"{run:<13} {r['bytes'] / 1e6:9.3f} {r['bytes'] / raw:6.3f} {normal_ratio:7.3f} "
                    f"{r['write_ms']:9.1f} {raw / 1e6 / (r['write_ms'] / 1e3):10.0f} {r['read8']:10.1f} "
                    f"{r['read64']:11.1f} {r['read64'] * raw / 1e6:12.0f}"
                )
        print("\nratio: stored / raw on the ViT-like data; normal: the same for random normal float16.")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
