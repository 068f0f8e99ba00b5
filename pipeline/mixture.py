"""Training on a mixture of datasets at given ratios, and the derived configs of the pseudo-labelling loop.

`data.train_sets` lists the sets of a mixture, each `{name, ratio, annotations, format, cache}`:

    data:
      annotations: msrvtt.json              # validation and test always come from here
      train_sets:
        - {name: msrvtt, ratio: 1}          # no annotations: the data section's training split and cache
        - {name: webvid, ratio: 7, format: captions_jsonl, annotations: webvid_captions.jsonl,
           filter: {top_fraction: 0.5}}

How batches are mixed. LAVIS (`MultiIterLoader`, `train_dataset_ratios`) draws, for every batch,
ONE dataset with `random.choices(range(n), ratios)` (probability ratio / sum of ratios) and takes
that dataset's next batch from an endless iterator over it (`IterLoader` restarts an exhausted
loader). `MixturePlan` does exactly that per global batch (optimiser step), with two differences
that keep the stage contract: the draw comes from a generator seeded by `(run.seed, epoch)`, not
Python's global `random`, so a resumed run sees the batches an uninterrupted one would; and it is
the same on every rank (LAVIS draws per rank), so one DDP step holds one set. Each set's endless
stream is its own `TrainPlan`'s epochs, one after another.

An epoch of the mixture is `ceil(steps_0 / p_0)` steps, where set 0 (the first listed) has
`steps_0` steps per epoch of its own and is drawn with probability `p_0`: set 0 is seen once per
epoch in expectation, so `train.epochs` still counts passes over the labelled data.

Training examples carry set-prefixed ids, `<set>/<video_id>`; `MixtureReader` routes each to its
set's reader (cache or video); ids without a known prefix (validation) go to the `data` section's.

The pseudo-labelling loop runs stages twice, as named instances on derived configs
(`run_pipeline.py`): `train_labelled` (`train` on the labelled set alone, `teacher_config`),
`pseudo_caption` (`caption` of the pooled set's videos with that model, `pseudo_caption_config`),
`extract_sets` (`extract` of every set with its own annotations into its own store,
`set_extract_configs`); the plain `train` stage then trains on the mixture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.annotations import VideoRecord, read_annotations, read_captions_jsonl
from pipeline.config import Config, TrainSetConfig
from pipeline.data import Example, TrainPlan, make_source
from pipeline.errors import StageError

SEPARATOR = "/"


# ---------------------------------------------------------------------------------------
# The plan: which set, then which examples, each step
# ---------------------------------------------------------------------------------------


class MixturePlan:
    """Training examples of every epoch from several `TrainPlan`s, one set per global batch."""

    def __init__(self, names: Sequence[str], ratios: Sequence[float], plans: Sequence[TrainPlan], seed: int):
        if not names or not len(names) == len(ratios) == len(plans):
            raise ValueError("a mixture needs one name, ratio and plan per set")
        batches = {p.global_batch for p in plans}
        if len(batches) != 1:
            raise ValueError(f"every set's plan must have the same global batch, got {sorted(batches)}")
        self.names, self.plans, self.seed = list(names), list(plans), seed
        self.global_batch = batches.pop()
        self.probabilities = np.asarray(ratios, dtype=float) / float(sum(ratios))
        self.steps_per_epoch = math.ceil(plans[0].steps_per_epoch / self.probabilities[0])
        self.examples_per_epoch = self.steps_per_epoch * self.global_batch
        self.videos = [
            (n + SEPARATOR + v, caps) for n, p in zip(names, plans, strict=True) for v, caps in p.videos
        ]
        # The last epoch built of each set: a large set's epoch spans many mixture epochs, and
        # building it (one Example per video) is what costs (bench_pseudo.py --plan).
        self._built: dict[int, tuple[int, list[Example]]] = {}

    def set_choices(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch,) index of the set each step of `epoch` draws from."""
        rng = np.random.default_rng([self.seed, epoch, 0x313])
        return rng.choice(len(self.plans), size=self.steps_per_epoch, p=self.probabilities)

    def epoch(self, epoch: int) -> list[Example]:
        """The epoch's examples, `global_batch` per step, each step from one set (ids set-prefixed)."""
        used = np.zeros(len(self.plans), dtype=np.int64)  # batches each set gave in earlier epochs
        for earlier in range(epoch):
            used += np.bincount(self.set_choices(earlier), minlength=len(self.plans))
        streams = [_Stream(self, k, int(u)) for k, u in enumerate(used)]
        examples: list[Example] = []
        for k in self.set_choices(epoch):
            examples += streams[k].next_batch()
        return examples

    # Same slicing of an epoch into ranks and micro-batches as a single set's plan.
    micro_batches = TrainPlan.micro_batches

    def set_epoch(self, k: int, epoch: int) -> list[Example]:
        """Epoch `epoch` of set `k`'s own plan (its ids unprefixed)."""
        if self._built.get(k, (None,))[0] != epoch:
            self._built[k] = (epoch, self.plans[k].epoch(epoch))
        return self._built[k][1]

    def describe(self) -> str:
        parts = [
            f"{n} {100 * p:.1f}% ({len(plan.videos)} videos)"
            for n, p, plan in zip(self.names, self.probabilities, self.plans, strict=True)
        ]
        return "mixture of " + ", ".join(parts) + f"; {self.steps_per_epoch} steps per epoch"


class _Stream:
    """Set `k`'s examples as an endless sequence of global batches: its plan's epochs in a row."""

    def __init__(self, mixture: MixturePlan, k: int, start_batch: int):
        self.mixture, self.k, self.batch = mixture, k, start_batch
        self.prefix, self.plan = mixture.names[k] + SEPARATOR, mixture.plans[k]

    def next_batch(self) -> list[Example]:
        epoch, step = divmod(self.batch, self.plan.steps_per_epoch)
        self.batch += 1
        b = self.plan.global_batch
        examples = self.mixture.set_epoch(self.k, epoch)[step * b : (step + 1) * b]
        return [Example(self.prefix + e.video_id, e.view, e.caption) for e in examples]


# ---------------------------------------------------------------------------------------
# The source: set-prefixed ids -> the set's cache (or videos)
# ---------------------------------------------------------------------------------------


class MixtureReader:
    """Picklable: loads each id from its set's reader (`<set>/<id>`), unprefixed ids from `default`."""

    def __init__(self, readers: dict[str, Any], default: Any):
        self.readers, self.default = readers, default

    def route(self, video_id: str) -> tuple[Any, str]:
        name, sep, rest = video_id.partition(SEPARATOR)
        if sep and name in self.readers:
            return self.readers[name], rest
        return self.default, video_id

    def load(self, video_ids: Sequence[str], views: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        groups: dict[int, tuple[Any, list[int], list[str]]] = {}
        for i, video_id in enumerate(video_ids):
            reader, bare = self.route(video_id)
            group = groups.setdefault(id(reader), (reader, [], []))
            group[1].append(i)
            group[2].append(bare)
        parts, kept = [], []
        for reader, indices, bare in groups.values():
            loaded, ok = reader.load(bare, [views[i] for i in indices])
            parts.append(loaded)
            kept += [indices[j] for j in ok]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        order = sorted(range(len(kept)), key=kept.__getitem__)  # back to the batch's order
        return tensor[order], [kept[i] for i in order]

    def __call__(self, video_ids: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        loaded, kept = self.load(video_ids, views)
        if len(kept) != len(video_ids):
            raise StageError(f"some videos of the batch could not be read: {list(video_ids)}")
        return loaded


class MixtureSource:
    """A source over several sets' sources; `encode` is the default's (every set is the same kind)."""

    def __init__(self, sources: dict[str, Any], default: Any):
        self.sources, self.default = sources, default
        self.needs_vision, self.fresh_views = default.needs_vision, default.fresh_views
        self.num_views, self.num_frames = default.num_views, default.num_frames
        self.reader = MixtureReader({n: s.reader for n, s in sources.items()}, default.reader)

    def available(self, video_ids: Sequence[str]) -> list[str]:
        groups: dict[str, list[str]] = {}
        for video_id in video_ids:
            name, sep, _ = video_id.partition(SEPARATOR)
            groups.setdefault(name if sep and name in self.sources else "", []).append(video_id)
        found = set(self.default.available(groups.pop("", [])))
        for name, ids in groups.items():
            bare = set(self.sources[name].available([v.partition(SEPARATOR)[2] for v in ids]))
            found.update(v for v in ids if v.partition(SEPARATOR)[2] in bare)
        return [v for v in video_ids if v in found]

    def encode(self, loaded: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        return self.default.encode(loaded, device)

    def frame_tokens(
        self, video_ids: Sequence[str], views: int | Sequence[int] = 0, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        views = [views] * len(video_ids) if isinstance(views, int) else list(views)
        return self.encode(self.reader(video_ids, views), device)


# ---------------------------------------------------------------------------------------
# Building the mixture of a config (the `train` stage's hook)
# ---------------------------------------------------------------------------------------


def set_cache_path(config: Config, train_set: TrainSetConfig) -> Path:
    """The set's store: its `cache`, the `data` section's for a set without annotations, else a default."""
    if not train_set.annotations:
        return config.cache_path
    if train_set.cache:
        return Path(train_set.cache)
    return config.output_dir / "extract_sets" / train_set.name / "features.zarr"


def set_records(train_set: TrainSetConfig) -> list[VideoRecord]:
    """The training videos of a set with its own annotations (pseudo-labels filtered)."""
    path = Path(train_set.annotations)
    if train_set.format == "captions_jsonl":
        if not path.is_file():
            raise StageError(
                f"train set {train_set.name!r}: {path} does not exist yet"
                + (" (run the pseudo_caption stage first)" if train_set.pool else "")
            )
        f = train_set.filter
        manifest = read_captions_jsonl(
            path, train_set.video_root, train_set.video_ext, f.score, f.min_confidence, f.top_fraction
        )
        return manifest.records
    manifest = read_annotations(train_set.format, path, train_set.video_root, train_set.video_ext)
    return manifest.split(train_set.split)


def mixture_job(job: Any, config: Config, model: Any) -> Any:
    """`job` (from `build_job`, on the labelled data) training on `data.train_sets` instead."""
    names, ratios, plans, sources = [], [], [], {}
    for train_set in config.data.train_sets:
        if not train_set.annotations:
            plan, source = job.plan, job.source  # the labelled training split, already checked
        else:
            records = set_records(train_set)
            set_config = dataclasses.replace(
                config, cache=dataclasses.replace(config.cache, path=str(set_cache_path(config, train_set)))
            )
            source = make_source(set_config, model, records, config.train.source)
            available = set(source.available([r.video_id for r in records]))
            missing = [r.video_id for r in records if r.video_id not in available]
            failed = source.store.failed() if hasattr(source, "store") else {}
            unextracted = [v for v in missing if v not in failed]
            if unextracted:
                raise StageError(
                    f"train set {train_set.name!r}: {len(unextracted)} of its {len(records)} videos are not "
                    f"extracted into {set_cache_path(config, train_set)} (e.g. {unextracted[0]!r}): "
                    "run the extract_sets stage first"
                )
            if missing:
                job.log.warning(
                    "train set %s: %d of %d videos failed to extract, training without them, e.g. %s",
                    train_set.name, len(missing), len(records), ", ".join(missing[:3]),
                )  # fmt: skip
            records = [r for r in records if r.video_id in available]
            if not records:
                raise StageError(f"train set {train_set.name!r} has no video available to train on")
            plan = TrainPlan(
                records,
                config.run.seed * 1000 + len(names) + 1,
                job.plan.captions,
                num_views=source.num_views,
                global_batch=job.plan.global_batch,
                fresh_views=source.fresh_views,
            )
        if source.num_frames != job.source.num_frames:
            raise StageError(
                f"train set {train_set.name!r}: its cache has {source.num_frames} frames per video, "
                f"the labelled data's {job.source.num_frames}"
            )
        names.append(train_set.name)
        ratios.append(train_set.ratio)
        plans.append(plan)
        sources[train_set.name] = source
    mixture = MixturePlan(names, ratios, plans, config.run.seed)
    job.log.info("train: %s", mixture.describe())
    return dataclasses.replace(job, plan=mixture, source=MixtureSource(sources, job.source))


# ---------------------------------------------------------------------------------------
# The pseudo-labelling loop's stage instances: derived configs
# ---------------------------------------------------------------------------------------


def teacher_config(config: Config) -> Config:
    """`train_labelled`: the `train` stage on the labelled data alone, in `<run>/train_labelled/`."""
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, train_sets=[]),
        cache=dataclasses.replace(config.cache, path=str(config.cache_path)),
        stage_folders={**config.stage_folders, "train": "train_labelled"},
    )


def pseudo_caption_config(config: Config) -> Config:
    """`pseudo_caption`: `caption` of the pooled set's videos with the `train_labelled` model.

    The captions (with their confidence) go to that set's `annotations`, in `<run>/pseudo_caption/`'s
    bookkeeping; its fingerprint folds in the `train_labelled` stage's.
    """
    pooled = [s for s in config.data.train_sets if s.pool]
    if not pooled:
        raise StageError(
            f"{config.source}: the pseudo_caption stage needs a train set with a `pool` of videos"
        )
    teacher = teacher_config(config)
    caption = dataclasses.replace(
        config.caption,
        inputs=list(pooled[0].pool),
        model=str(teacher.stage_dir("train") / "best"),
        out=pooled[0].annotations,
    )
    # The caption stage depends on the run's train and scst models; here both are the teacher.
    folders = {**teacher.stage_folders, "scst": "train_labelled", "caption": "pseudo_caption"}
    return dataclasses.replace(teacher, caption=caption, stage_folders=folders)


def set_extract_configs(config: Config) -> list[tuple[str, Config]]:
    """`extract_sets`: one `extract` per set with its own annotations, into `<run>/extract_sets/<name>/`.

    Every record of the set is extracted (the filter applies when training), so trying another
    filter reuses the store.
    """
    configs = []
    for train_set in config.data.train_sets:
        if not train_set.annotations:
            continue
        data = dataclasses.replace(
            config.data,
            format=train_set.format,
            annotations=train_set.annotations,
            video_root=train_set.video_root,
            video_ext=train_set.video_ext,
            train_sets=[],
        )
        derived = dataclasses.replace(
            config,
            data=data,
            cache=dataclasses.replace(config.cache, path=str(set_cache_path(config, train_set))),
            extract=dataclasses.replace(config.extract, splits=[]),
            stage_folders={**config.stage_folders, "extract": f"extract_sets/{train_set.name}"},
        )
        configs.append((train_set.name, derived))
    return configs
