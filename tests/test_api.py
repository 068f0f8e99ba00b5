"""The Python API (`pipeline.app.api`): same code paths and results as the command line."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.app.api import Captioner, open_cache, run_config
from pipeline.config import load_config
from pipeline.demo.synth import make_synthetic_world
from pipeline.demo.testmodels import init_model
from pipeline.video import load_clip
from stages.caption import caption_videos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """A tiny world and model, and a config of extract + one epoch of CE, run through the API."""
    root = tmp_path_factory.mktemp("api")
    world = make_synthetic_world(root / "world", num_videos=12, seed=2, frames=8, size=32)
    model = init_model(root / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    raw = {
        "run": {"output_dir": str(root / "run"), "device": "cpu", "stages": ["extract", "train"]},
        "data": {"annotations": str(world["annotations"]), "video_root": str(world["videos"])},
        "decode": {"backend": "pyav"},
        "model": {"pretrained": str(model), "num_frames": 4, "image_size": 32, "llm": "full"},
        "train": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "num_workers": 0},
        "eval": {"max_new_tokens": 6, "min_new_tokens": 1},
        "caption": {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 1},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    summary = run_config(config_path, overrides=["train.lr=1e-3"])
    return root, world, config_path, summary


def test_run_config_runs_the_pipeline_and_honours_overrides(api_run):
    root, _, config_path, summary = api_run
    assert list(summary["stages"]) == ["extract", "train"]
    assert json.loads((root / "run/summary.json").read_text())["stages"].keys() == summary["stages"].keys()
    done = json.loads((root / "run/train/DONE.json").read_text())
    assert done["settings"]["train.lr"] == 1e-3
    again = run_config(config_path, overrides=["train.lr=1e-3"])  # a finished run is skipped
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}


def test_caption_files_equals_the_command_lines_records(api_run, tmp_path):
    root, world, config_path, _ = api_run
    config = load_config(config_path)
    videos = sorted(Path(world["videos"]).glob("*.mp4"))[:3]
    best = root / "run/train/best"
    records = Captioner(best, config).caption_files([str(v) for v in videos])
    cli_out = tmp_path / "cli.jsonl"
    caption_videos([str(v) for v in videos], str(best), str(cli_out), config)
    cli = [json.loads(line) for line in cli_out.read_text().splitlines()]
    assert [r["video"] for r in records] == [str(v.resolve()) for v in videos]
    assert [r["caption"] for r in records] == [r["caption"] for r in cli]


def test_caption_frames_equals_caption_files_on_the_same_decoded_frames(api_run):
    root, world, config_path, _ = api_run
    config = load_config(config_path)
    captioner = Captioner(root / "run/train/best", config)
    videos = sorted(Path(world["videos"]).glob("*.mp4"))[:2]
    frames = np.stack(
        [load_clip(v, captioner.num_frames, captioner.image_size, backend="pyav") for v in videos]
    )
    from_files = [r["caption"] for r in captioner.caption_files([str(v) for v in videos])]
    assert captioner.caption_frames(frames) == from_files
    assert captioner.caption_frames(frames[0]) == from_files[:1]  # one clip without a batch axis
    with pytest.raises(ValueError, match="expected"):
        captioner.caption_frames(frames[:, :2])  # too few frames for this model


def test_open_cache_reads_the_extracted_tokens(api_run):
    root, *_ = api_run
    store = open_cache(root / "run/extract/features.zarr")
    tokens = store.read(store.video_ids[:2])
    assert tokens.shape[0] == 2 and tokens.dtype == np.float16 and np.abs(tokens).sum() > 0


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python example, verbatim, in a folder whose configs/demo.yaml is a short demo."""
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- API-EXAMPLE -->\n```python\n(.*?)```", readme, re.S).group(1)
    demo = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    demo["run"]["demo_videos"] = 120
    demo["train"]["epochs"], demo["scst"]["epochs"], demo["eval"]["num_beams"] = 2, 1, 1
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/demo.yaml").write_text(yaml.safe_dump(demo))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["records"] and all("caption" in r for r in namespace["records"])
    assert len(namespace["captions"]) == 1 and namespace["tokens"].shape[0] == 2
