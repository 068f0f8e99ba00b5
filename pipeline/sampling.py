"""Which frames of a video we look at, how each view is augmented, and how pixels are normalised.

A video is seen through *views*. View 0 is the evaluation view: `uniform` indices, the
whole frame resized. Views 1, 2, ... are training views: `headtail` indices, one random
resized crop and one horizontal flip decision for the whole clip. Every random choice of a
view comes from `view_rng(seed, video_id, view)`, so a view is the same on every machine,
in every process and on every re-run: the feature cache can be rebuilt bit for bit.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

SAMPLING_MODES = ("uniform", "headtail")
EVAL_SAMPLING = "uniform"  # view 0: what eval and caption look at
# How every view's frames are chosen and augmented; part of the cache's fingerprint, so
# changing the scheme in this file must change this string.
VIEW_SCHEME = (
    "v1: view0=uniform segment starts, full frame; views>=1=headtail + random resized crop (0.5-1) + hflip"
)

# CLIP's normalisation, which BLIP-2's EVA ViT was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_frame_indices(
    num_video_frames: int,
    num_frames: int,
    mode: str = "uniform",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Pick `num_frames` (T) frame indices of a video with `num_video_frames` (n) frames.

    * `uniform` (evaluation): the start of each of T equal segments,
      `np.arange(0, n, n / T).astype(int)` as the method's public code computed it. Floating
      point makes that arange return T + 1 values for some (n, T) (e.g. n=17, T=7); we keep
      the first T.
    * `headtail` (training): T // 2 sorted random indices from the first half of the video
      and the other T - T // 2 (one more when T is odd) from the second half, each half
      without repetition. Needs `rng`.

    Videos shorter than T frames (n < T), either mode: every frame is used, in order, and
    frame `i * n // T` fills slot i, so each frame is repeated T // n or T // n + 1 times
    (n=3, T=8 -> 0 0 0 1 1 1 2 2). The result is therefore always exactly T indices.

    Returns int64 indices of shape (T,), sorted non-decreasing, all in [0, n).
    """
    if num_video_frames < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose from {', '.join(SAMPLING_MODES)}")
    n, t = num_video_frames, num_frames
    if n < t:
        return (np.arange(t, dtype=np.int64) * n) // t
    if mode == "uniform":
        return np.arange(0, n, n / t).astype(np.int64)[:t]
    if rng is None:
        raise ValueError("headtail sampling is random: pass rng (e.g. view_rng(seed, video_id, view))")
    middle = n // 2
    head = rng.choice(middle, size=t // 2, replace=False)
    tail = middle + rng.choice(n - middle, size=t - t // 2, replace=False)
    return np.sort(np.concatenate([head, tail])).astype(np.int64)


def view_rng(seed: int, video_id: str, view: int) -> np.random.Generator:
    """The random generator of one view of one video, a pure function of its arguments.

    Python's `hash()` of a string changes between processes, so we hash with SHA-256.
    """
    key = f"{int(seed)}\x00{video_id}\x00{int(view)}".encode()
    digest = hashlib.sha256(key).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def random_resized_crop_params(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` with a numpy generator: `(top, left, h, w)`.

    Ten tries at a crop whose area is a `scale` fraction of the image and whose aspect
    ratio (w / h) is log-uniform in `ratio`; if none fits, the largest centred crop whose
    aspect ratio is within `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, min(height, round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = min(width, round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalize_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] then CLIP-normalised."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (..., H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
    x = frames.movedim(-1, -3).to(torch.float32).div_(255.0)  # (..., 3, H, W)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - mean) / std
