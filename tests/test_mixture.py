"""Training on a mixture of sets (`pipeline/mixture.py`): proportions, routing, resume, the train stage."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.annotations import VideoRecord
from pipeline.config import ConfigError, config_from_dict
from pipeline.data import Sharding, TrainPlan
from pipeline.demo.tinyworld import tiny_config
from pipeline.mixture import MixturePlan, MixtureReader, set_extract_configs, teacher_config


def _plan(prefix: str, videos: int, seed: int, batch: int = 4) -> TrainPlan:
    records = [
        VideoRecord(f"{prefix}{i}", f"/v/{prefix}{i}.mp4", "train", (f"caption {i}",)) for i in range(videos)
    ]
    return TrainPlan(records, seed, global_batch=batch)


def _mixture(ratios=(1.0, 7.0), seed=0) -> MixturePlan:
    return MixturePlan(["lab", "pseudo"], list(ratios), [_plan("a", 10, 1), _plan("b", 50, 2)], seed)


@pytest.mark.parametrize("ratios", [(1, 1), (1, 3), (1, 7), (2, 1)])
def test_realised_proportions_match_the_ratios_one_set_per_batch(ratios):
    mixture = _mixture(ratios)
    counts: Counter[str] = Counter()
    steps = 0
    for epoch in range(60):
        examples = mixture.epoch(epoch)
        assert len(examples) == mixture.steps_per_epoch * 4
        for step in range(mixture.steps_per_epoch):
            sets = {e.video_id.split("/")[0] for e in examples[step * 4 : (step + 1) * 4]}
            assert len(sets) == 1, f"step {step} mixes sets {sets}"
            counts[sets.pop()] += 1
            steps += 1
    p = ratios[0] / sum(ratios)
    sigma = math.sqrt(p * (1 - p) / steps)
    assert abs(counts["lab"] / steps - p) < 4 * sigma, (counts, steps, p)


def test_an_epoch_sees_the_first_set_once_in_expectation():
    assert _mixture((1, 7)).steps_per_epoch == math.ceil(3 / (1 / 8))  # 10 videos / batch 4 = 3 steps
    assert _mixture((1, 1)).steps_per_epoch == 6
    assert _mixture((3, 1)).steps_per_epoch == 4


def test_each_set_is_an_endless_stream_of_its_own_epochs():
    """Concatenated over mixture epochs, a set's batches are its TrainPlan's epochs in a row."""
    mixture, plan = _mixture((1, 7)), _plan("b", 50, 2)
    seen = [e for epoch in range(4) for e in mixture.epoch(epoch) if e.video_id.startswith("pseudo/")]
    expected = [e for epoch in range(10) for e in plan.epoch(epoch)][: len(seen)]
    assert [(e.video_id, e.caption) for e in seen] == [("pseudo/" + e.video_id, e.caption) for e in expected]
    assert len(seen) > plan.steps_per_epoch * 4  # it did wrap into a second epoch of the set


def test_plan_is_a_pure_function_and_resumes_exactly():
    a, b = _mixture(seed=3), _mixture(seed=3)
    assert a.epoch(2) == b.epoch(2)  # a fresh plan (a resumed run) sees the same examples
    assert a.epoch(2) != _mixture(seed=4).epoch(2)
    sharding = Sharding(4, world_size=2, rank=1, grad_accum=2)
    full = a.micro_batches(2, sharding)
    assert b.micro_batches(2, sharding, start_step=5) == full[5 * 2 :]


class _FakeReader:
    def __init__(self, value: float, fail: str = ""):
        self.value, self.fail, self.calls = value, fail, []

    def load(self, ids, views):
        self.calls.append(list(ids))
        kept = [i for i, v in enumerate(ids) if v != self.fail]
        rows = [torch.full((1, 2), self.value + int(ids[i][1:])) for i in kept]
        return torch.cat(rows), kept


def test_reader_routes_prefixed_ids_to_their_set_and_keeps_batch_order():
    lab, pseudo = _FakeReader(100.0), _FakeReader(200.0, fail="v3")
    reader = MixtureReader({"lab": lab, "pseudo": pseudo}, default=lab)
    ids = ["pseudo/v1", "lab/v2", "pseudo/v3", "v4", "pseudo/v5"]
    loaded, kept = reader.load(ids, [0] * len(ids))
    assert kept == [0, 1, 3, 4]  # v3 could not be read
    assert loaded[:, 0].tolist() == [201.0, 102.0, 104.0, 205.0]
    assert pseudo.calls == [["v1", "v3", "v5"]] and lab.calls == [["v2", "v4"]]


def test_train_sets_config_is_validated_and_names_the_key():
    base = {"data": {"annotations": "a.jsonl"}}

    def build(sets):
        return config_from_dict({"data": {**base["data"], "train_sets": sets}}, "c.yaml")

    config = build([{"name": "lab"}, {"name": "ps", "ratio": 3, "format": "captions_jsonl", "annotations": "p.jsonl",
                                      "filter": {"top_fraction": 0.5}}])  # fmt: skip
    assert config.data.train_sets[1].filter.top_fraction == 0.5 and config.data.train_sets[1].ratio == 3.0
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key data.train_sets\[0\].ratoi"):
        build([{"name": "lab", "ratoi": 2}])
    with pytest.raises(ConfigError, match="ratio must be > 0"):
        build([{"name": "lab", "ratio": 0}])
    with pytest.raises(ConfigError, match="names must be unique"):
        build([{"name": "lab"}, {"name": "lab"}])
    with pytest.raises(ConfigError, match="top_fraction"):
        build([{"name": "p", "format": "captions_jsonl", "annotations": "p", "filter": {"top_fraction": 0}}])


def test_stage_instances_write_their_own_folders(tmp_path):
    config = config_from_dict(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "data": {
                "annotations": "a.jsonl",
                "train_sets": [{"name": "lab"}, {"name": "web", "annotations": "w"}],
            },
        }
    )
    teacher = teacher_config(config)
    assert teacher.stage_dir("train") == tmp_path / "run" / "train_labelled" and not teacher.data.train_sets
    assert teacher.cache_path == config.cache_path
    [(name, derived)] = set_extract_configs(config)
    assert name == "web" and derived.stage_dir("extract") == tmp_path / "run" / "extract_sets" / "web"
    assert derived.cache_path == tmp_path / "run" / "extract_sets" / "web" / "features.zarr"


def _pseudo_set(world, tmp_path) -> str:
    """A captions_jsonl set over the tiny world's training videos (in its cache), one caption each."""
    rows = [json.loads(line) for line in Path(world["annotations"]).read_text().splitlines()]
    path = tmp_path / "pseudo.jsonl"
    with path.open("w") as f:
        for i, row in enumerate(r for r in rows if r["split"] == "train"):
            record = {"video": f"{world['videos']}/{row['video']}", "video_id": row["video_id"],
                      "caption": row["captions"][-1], "confidence": 0.5 + i / 100}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_train_stage_on_a_mixture_resumes_bit_for_bit(tiny_world, tmp_path, one_thread):
    import stages.train as train

    sets = [
        {"name": "lab", "ratio": 1},
        {"name": "ps", "ratio": 1, "format": "captions_jsonl", "annotations": _pseudo_set(tiny_world, tmp_path),
         "cache": tiny_world["cache"]},
    ]  # fmt: skip
    config = tiny_config(tiny_world, tmp_path / "run", data={"train_sets": sets}, train={"epochs": 1})
    summary = train.run(config)
    out = config.stage_dir("train")
    assert (
        summary["steps_per_epoch"] == 6 and summary["steps"] == 6
    )  # 12 labelled videos / 4 = 3 steps, p = 1/2
    assert "mixture of lab 50.0%" in (out / "log.txt").read_text()

    final = out / "checkpoints" / "step_00000006" / "trainable.safetensors"
    reference = load_file(str(final))
    (out / "DONE.json").unlink()
    for path in sorted(final.parent.iterdir()):
        path.unlink()
    final.parent.rmdir()  # as if killed before the last checkpoint: resumes from step 4
    train.run(config)
    assert "resuming from" in (out / "log.txt").read_text()
    resumed = load_file(str(final))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_set_not_yet_extracted_is_refused_with_the_stage_to_run(tiny_world, tmp_path, one_thread):
    import stages.train as train
    from pipeline.errors import StageError

    path = Path(_pseudo_set(tiny_world, tmp_path))
    with path.open("a") as f:
        f.write(
            json.dumps({"video": "/elsewhere/new.mp4", "video_id": "new", "caption": "a new video"}) + "\n"
        )
    sets = [{"name": "lab"}, {"name": "ps", "format": "captions_jsonl", "annotations": str(path),
                              "cache": tiny_world["cache"]}]  # fmt: skip
    config = tiny_config(tiny_world, tmp_path / "run", data={"train_sets": sets}, train={"epochs": 1})
    with pytest.raises(
        StageError, match=r"train set 'ps': 1 of its 13 videos are not extracted .*'new'.*extract_sets"
    ):
        train.run(config)


def test_vidcap_plan_shows_the_mixture_and_its_epoch(tiny_world, tmp_path):
    from pipeline.plan import format_plan, plan_config

    sets = [{"name": "lab", "ratio": 1}, {"name": "ps", "ratio": 3, "format": "captions_jsonl",
                                          "annotations": "p.jsonl", "filter": {"top_fraction": 0.5}}]  # fmt: skip
    config = tiny_config(tiny_world, tmp_path / "run", data={"train_sets": sets}, train={"epochs": 1})
    train_plan = next(p for p in plan_config(config, gpus=1) if p.stage == "train")
    assert train_plan.steps_per_epoch == 12  # 12 labelled videos / 4 = 3 steps, drawn with p = 1/4
    text = format_plan([train_plan], "c.yaml")
    assert "lab 25.0% of the steps" in text and "ps 75.0% of the steps" in text and "top 50%" in text


def test_rewritten_pseudo_labels_make_the_mixture_stage_stale(tiny_world, tmp_path):
    from pipeline.runtime.stage import stage_inputs

    path = Path(_pseudo_set(tiny_world, tmp_path))
    sets = [{"name": "lab"}, {"name": "ps", "format": "captions_jsonl", "annotations": str(path)}]
    config = tiny_config(tiny_world, tmp_path / "run", data={"train_sets": sets})
    before = stage_inputs(config, "train")
    path.write_text(path.read_text().replace('"confidence": 0.5', '"confidence": 0.25'))
    after = stage_inputs(config, "train")
    assert before["ps annotations"] != after["ps annotations"]
    assert before["annotations"] == after["annotations"]  # the labelled data did not change
