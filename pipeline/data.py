"""Frame tokens for a list of videos, from the feature cache or from raw video, and the training data.

A *source* turns `(video_ids, views)` into frame tokens (B, T, L, D) on the compute device, in
two halves so that data-loader workers can do the slow part:

* `source.reader(video_ids, views)` runs in a worker process and returns something picklable:
  float16 cached tokens (`CacheSource`: one Zarr read) or normalised pixels (`VideoSource`:
  decode with `load_clip`);
* `source.encode(loaded, device)` runs in the training process: a cast to float32 on the device
  (cache), or the frozen ViT (`model.encode_frames`, video).

`train`, `scst`, `eval` and `caption` all take frame tokens through a source, so switching
`train.source: cache | video` changes nothing else. With the cache the ViT is never loaded.

The training data of one epoch is a fixed *plan*: a list of `(video_id, view, caption)`
drawn from `(run.seed, epoch)` only, so a resumed run sees exactly the batches an
uninterrupted one would; each read of a video takes its next view. Every optimiser step consumes one global batch of the plan; rank r
of w takes its contiguous 1/w share, split into `grad_accum` micro-batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.store import FeatureStore, StoreError
from pipeline.annotations import VideoRecord
from pipeline.features import check_store_fingerprint
from pipeline.sampling import normalize_frames
from pipeline.text import clean_caption
from pipeline.video import VideoDecodeError, load_clip

log = logging.getLogger("vidcap.data")


# ---------------------------------------------------------------------------------------
# Sources: (video_ids, views) -> frame tokens
# ---------------------------------------------------------------------------------------


class CacheReader:
    """Picklable half of `CacheSource`: float16 tokens (B, T, L, D) from the store, as a tensor."""

    def __init__(self, store: Any):
        self.store = store  # a FeatureStore pickles as its path; each worker opens it lazily

    def __call__(self, video_ids: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.store.read(list(video_ids), views=list(views)))

    def load(self, video_ids: Sequence[str], views: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Like calling the reader; also returns which items were loaded (all: the plan holds done videos)."""
        return self(video_ids, views), list(range(len(video_ids)))


class CacheSource:
    """Frame tokens read from the Zarr feature cache written by `extract`."""

    needs_vision = False
    fresh_views = False  # training cycles through the stored views

    def __init__(self, store: Any):
        self.store = store
        self.reader = CacheReader(store)
        _, self.num_views, self.num_frames, _, _ = store.shape

    def available(self, video_ids: Sequence[str]) -> list[str]:
        """The ids among `video_ids` whose tokens are in the cache (failed or pending ones are not)."""
        done = self.store.done_ids()
        return [v for v in video_ids if v in done]

    def encode(self, loaded: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        # Tokens travel as float16 (half the bytes through worker pipes and host-to-device copies).
        return loaded.to(device, non_blocking=True).float()  # (B, T, L, D)

    def frame_tokens(
        self, video_ids: Sequence[str], views: int | Sequence[int] = 0, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        views = [views] * len(video_ids) if isinstance(views, int) else list(views)
        return self.encode(self.reader(video_ids, views), device)


class ClipReader:
    """Picklable half of `VideoSource`: decode and normalise clips -> float32 (B, T, 3, S, S)."""

    def __init__(
        self,
        paths: dict[str, str],
        num_frames: int,
        image_size: int,
        seed: int,
        backend: str,
        threads: int = 0,
    ):
        self.paths = paths
        self.num_frames, self.image_size, self.seed = num_frames, image_size, seed
        self.backend, self.threads = backend, threads

    def clip(self, video_id: str, view: int) -> np.ndarray:

        return load_clip(
            self.paths[video_id],
            self.num_frames,
            self.image_size,
            view=int(view),
            seed=self.seed,
            video_id=video_id,
            backend=self.backend,
            threads=self.threads,
        )  # (T, S, S, 3) uint8

    def __call__(self, video_ids: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        """Pixels of every clip; a video that cannot be decoded raises `VideoDecodeError`."""

        clips = [self.clip(v, view) for v, view in zip(video_ids, views, strict=True)]
        return normalize_frames(np.stack(clips))  # (B, T, 3, S, S)

    def load(self, video_ids: Sequence[str], views: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """For training: skip (and log) videos that cannot be decoded rather than stop the run."""

        clips, kept = [], []
        for i, (v, view) in enumerate(zip(video_ids, views, strict=True)):
            try:
                clips.append(self.clip(v, view))
                kept.append(i)
            except VideoDecodeError as e:
                log.warning("skipping video %s in this batch: %s", v, e)
        if not clips:
            raise VideoDecodeError(f"no video of the batch could be decoded: {', '.join(video_ids)}")
        return normalize_frames(np.stack(clips)), kept


class VideoSource:
    """Frame tokens computed on the fly: decode with `load_clip`, then the model's frozen ViT.

    Views follow the cache's convention (0: evaluation sampling, 1..: augmented with the run
    seed), so the same video, view and seed give the same frames as `extract` stored.
    """

    needs_vision = True

    def __init__(
        self,
        records: Sequence[VideoRecord],
        model: Any,
        decode_cfg: Any,
        model_cfg: Any,
        seed: int = 0,
        num_views: int = 1,
    ):
        self.model = model
        self.num_views = num_views
        self.fresh_views = num_views > 1  # every read of a video draws a new augmentation
        self.num_frames = model_cfg.num_frames
        self.reader = ClipReader(
            {r.video_id: r.path for r in records},
            model_cfg.num_frames,
            model.image_size,  # model.image_size 0 resolved: the checkpoint's own
            seed,
            decode_cfg.backend,
            decode_cfg.threads,
        )

    def available(self, video_ids: Sequence[str]) -> list[str]:
        return [v for v in video_ids if v in self.reader.paths]

    def encode(self, loaded: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        # No gradient unless the model trains its ViT (`model.vit: full`, in train mode).
        return self.model.encode_frames(loaded.to(device, non_blocking=True)).float()  # (B, T, L, D)

    def frame_tokens(
        self, video_ids: Sequence[str], views: int | Sequence[int] = 0, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        views = [views] * len(video_ids) if isinstance(views, int) else list(views)
        return self.encode(self.reader(video_ids, views), device)


def make_source(
    config: Any, model: Any, records: Sequence[VideoRecord], kind: str
) -> CacheSource | VideoSource:
    """`kind` = `cache`: the store at `config.cache_path`, checked against the model settings; `video`."""
    if kind == "video":
        return VideoSource(
            records,
            model,
            config.decode,
            config.model,
            seed=config.run.seed,
            num_views=1 + config.cache.train_views,
        )

    store = FeatureStore.open(config.cache_path)
    _, views, frames, length, width = store.shape
    expected = {"frames": config.model.num_frames, "views": 1 + config.cache.train_views}
    if model is not None:
        expected.update(tokens_per_frame=model.tokens_per_frame, width=model.vision_width)
    have = {"frames": frames, "views": views, "tokens_per_frame": length, "width": width}
    wrong = [f"{k}: cache {have[k]}, config/model {v}" for k, v in expected.items() if have[k] != v]
    if wrong:
        raise StoreError(
            f"the feature cache {config.cache_path} does not match this config (model.num_frames, "
            f"cache.train_views, model.image_size, model.pretrained):\n  " + "\n  ".join(wrong)
        )
    # The tokens must be this model's ViT's, with these frames and sampling, as `extract` checks.
    pretrained = model.pretrained if model is not None else config.model.pretrained
    check_store_fingerprint(store, config, pretrained, model.cfg if model is not None else config.model)
    return CacheSource(store)


# ---------------------------------------------------------------------------------------
# Training plan: which (video, view, caption) each step sees
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    video_id: str
    view: int
    caption: str
    """The training target: a caption, or an answer (`data.task: qa`)."""
    prompt: str | None = None
    """This example's own language-model prompt (a question); None: the model's `prompt`."""


@dataclass(frozen=True)
class Sharding:
    """How one global batch is split: `world_size` ranks x `grad_accum` micro-batches each."""

    global_batch: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)


class TrainPlan:
    """The training examples of every epoch, a pure function of (seed, epoch).

    `captions="sample"`: each video once per epoch with one random cleaned reference;
    `"all"`: every (video, reference) pair. An epoch is padded by wrapping around to whole
    global batches, so every rank runs the same number of steps.

    Views: each read of a video (the k-th in the run, counted over epochs) takes the next
    training view of that video, from a random starting view. From the cache (`fresh_views`
    False) this cycles through the V-1 stored views; from video (`fresh_views` True) read k draws
    view `1 + start + k`, a new head-tail sample, crop and flip every time (`view_rng(seed, video,
    view)`), whose first draws are the cached views. Without augmented views (V = 1): view 0.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        seed: int,
        captions: str = "sample",
        num_views: int = 1,
        global_batch: int = 1,
        fresh_views: bool = False,
    ):
        self.videos = self.video_targets(records)
        if not self.videos:
            raise ValueError("no training video has a reference caption")
        self.seed, self.captions, self.num_views, self.global_batch = seed, captions, num_views, global_batch
        self.fresh_views = fresh_views
        pairs = sum(len(c) for _, c in self.videos) if captions == "all" else len(self.videos)
        self.examples_per_epoch = pairs
        self.steps_per_epoch = math.ceil(pairs / global_batch)
        stored = max(num_views - 1, 1)
        self._first_view = np.random.default_rng([seed, 1 << 20]).integers(stored, size=len(self.videos))

    def video_targets(self, records: Sequence[Any]) -> list[tuple[str, list[Any]]]:
        """`(video_id, [targets])` of every video with a target: its cleaned captions (subclasses: others)."""
        videos = [(r.video_id, [c for c in map(clean_caption, r.captions) if c]) for r in records]
        return [(v, caps) for v, caps in videos if caps]

    def epoch(self, epoch: int) -> list[Example]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.captions == "all":
            items = [(i, c) for i, (_, caps) in enumerate(self.videos) for c in caps]
        else:
            items = [(i, caps[rng.integers(len(caps))]) for i, (_, caps) in enumerate(self.videos)]
        reads: dict[int, int] = {}
        examples = []
        for j in rng.permutation(len(items)):
            video, caption = items[j]
            read = reads[video] = reads.get(video, -1) + 1
            examples.append(self.example(self.videos[video][0], self.view(video, epoch, read), caption))
        total = self.steps_per_epoch * self.global_batch
        return [examples[i % len(examples)] for i in range(total)]

    def view(self, video: int, epoch: int, read: int) -> int:
        """The view of the `read`-th reading of video number `video` in `epoch`."""
        if self.num_views <= 1:
            return 0
        per_epoch = len(self.videos[video][1]) if self.captions == "all" else 1
        draw = int(self._first_view[video]) + epoch * per_epoch + read
        return 1 + draw if self.fresh_views else 1 + draw % (self.num_views - 1)

    def example(self, video_id: str, view: int, target: Any) -> Example:
        """One plan entry from a video's target (a caption here; subclasses hold other targets)."""
        return Example(video_id, view, target)

    def micro_batches(self, epoch: int, sharding: Sharding, start_step: int = 0) -> list[list[Example]]:
        """This rank's micro-batches from `start_step` of `epoch` on, `grad_accum` per step, in order."""
        plan, b, m = self.epoch(epoch), sharding.global_batch, sharding.micro_batch
        batches = []
        for step in range(start_step, self.steps_per_epoch):
            mine = plan[step * b + sharding.rank * m * sharding.grad_accum :][: m * sharding.grad_accum]
            batches += [mine[i * m : (i + 1) * m] for i in range(sharding.grad_accum)]
        return batches


class MicroBatches(torch.utils.data.Dataset):
    """Item i = micro-batch i, loaded by `reader` (runs in DataLoader workers)."""

    def __init__(self, batches: list[list[Example]], reader: Any):
        self.batches, self.reader = batches, reader

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return collate(self.batches[i], self.reader)


def collate(examples: Sequence[Example], reader: Any) -> dict[str, Any]:
    """`{"video_ids", "views", "captions", "inputs"}` (+ `"prompts"`); `inputs` is what `source.encode` takes."""
    inputs, kept = reader.load([e.video_id for e in examples], [e.view for e in examples])
    examples = [examples[i] for i in kept]
    batch = {
        "video_ids": [e.video_id for e in examples],
        "views": [e.view for e in examples],
        "captions": [e.caption for e in examples],
        "inputs": inputs,
    }
    if any(e.prompt is not None for e in examples):
        batch["prompts"] = [e.prompt for e in examples]
    return batch


def to_device(batch: dict[str, Any], source: Any, device: str | torch.device) -> dict[str, Any]:
    """A loaded batch -> `{"video_ids", "frame_tokens" (B, T, L, D) float32 on device, "captions"}`
    (and `"prompts"` when the examples have their own)."""
    moved = {
        "video_ids": batch["video_ids"],
        "captions": batch["captions"],
        "frame_tokens": source.encode(batch["inputs"], device),
    }
    if "prompts" in batch:
        moved["prompts"] = batch["prompts"]
    return moved


def make_loader(
    plan: TrainPlan,
    source: Any,
    epoch: int,
    sharding: Sharding,
    start_step: int,
    num_workers: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """The DataLoader of one epoch for one rank, from `start_step` on (a resumed epoch)."""
    dataset = MicroBatches(plan.micro_batches(epoch, sharding, start_step), source.reader)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # A generator of our own: creating the workers must not consume the global torch RNG,
        # or a resumed run's dropout masks would differ from an uninterrupted run's.
        generator=torch.Generator().manual_seed(plan.seed * 1000 + epoch),
        prefetch_factor=2 if num_workers else None,
    )


def iterate_videos(video_ids: Sequence[str], batch_size: int) -> list[list[str]]:
    """Consecutive batches of ids (for validation / generation)."""
    return [list(video_ids[i : i + batch_size]) for i in range(0, len(video_ids), batch_size)]
