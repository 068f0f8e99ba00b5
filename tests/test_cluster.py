"""Dask clusters as users start them: paths sent to workers, shared-path checks, and the README's
cluster steps run literally with real `dask scheduler` / `dask worker` processes (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import absolute_path, config_from_dict, model_location
from pipeline.errors import StageError
from pipeline.runtime.cluster import dask_client, require_shared_paths

REPO = Path(__file__).resolve().parents[1]


def test_every_path_a_worker_gets_is_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    config = config_from_dict(
        {
            "run": {"output_dir": "runs/x"},
            "data": {"annotations": "ann.jsonl", "video_root": "videos"},
            "model": {"pretrained": "models/tiny"},
            "cache": {"path": "cache/f.zarr"},
            "caption": {"inputs": ["list.txt"], "model": "Salesforce/blip2-opt-2.7b", "out": "out.jsonl"},
        }
    )
    sent = config.with_absolute_paths()
    assert sent.run.output_dir == str(tmp_path / "runs/x")
    assert (sent.data.annotations, sent.data.video_root) == (
        str(tmp_path / "ann.jsonl"),
        str(tmp_path / "videos"),
    )
    assert sent.model.pretrained == str(tmp_path / "models/tiny")  # a folder here: absolute
    assert sent.caption.model == "Salesforce/blip2-opt-2.7b"  # no such folder: a hub id, as written
    assert sent.cache.path == str(tmp_path / "cache/f.zarr")
    assert sent.caption.inputs == [str(tmp_path / "list.txt")] and sent.caption.out == str(
        tmp_path / "out.jsonl"
    )
    assert absolute_path("") == "" and model_location("") == ""


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, message, *args):
        self.lines.append(message % args)


def test_a_worker_that_cannot_see_a_shared_path_is_one_line_naming_worker_and_path(tmp_path):
    log = _Log()
    with dask_client(workers=1, processes=False) as client:
        require_shared_paths(client, {"model folder": str(tmp_path)}, log)  # visible: no error
        with pytest.raises(StageError) as error:
            require_shared_paths(
                client, {"model folder": str(tmp_path), "video folder": "/no/such/videos"}, log
            )
    message = str(error.value)
    assert "cannot see the video folder /no/such/videos" in message and "worker 0" in message
    assert "model folder" not in message.split("cannot see")[1]
    assert f"model folder {tmp_path}" in log.lines[0]


# ---------------------------------------------------------------------------------------
# The README's cluster steps with real processes
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _vidcap(project: Path, *args: str) -> dict:
    """`vidcap ARGS` run in `project`, as a user types it; its JSON summary."""
    command = [sys.executable, "-c", "from pipeline.app.cli import main; main()", *args]
    done = subprocess.run(command, cwd=project, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker`s, started from a directory that is not the project's."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]  # = the `dask` command of this environment
    procs = [
        subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
            cwd=elsewhere, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    ]  # fmt: skip
    for i in range(2):
        worker = [*dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--memory-limit", "0"]
        procs.append(
            subprocess.Popen(
                [*worker, "--name", f"{socket.gethostname()}-gpu{i}"],
                cwd=elsewhere, env={**_env(), "CUDA_VISIBLE_DEVICES": str(i)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        )  # fmt: skip
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in procs:  # torn down by PID: each process group (nanny + worker)
            with _suppress():
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


class _suppress:  # noqa: N801
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is ProcessLookupError or kind is PermissionError


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the repository's demo config beside a small demo world and tiny model, as the
    quick start leaves them (relative paths: demo_data/..., runs/demo)."""
    from pipeline.demo.synth import make_synthetic_world
    from pipeline.demo.testmodels import init_model

    root = tmp_path_factory.mktemp("project")
    (root / "configs").mkdir()
    shutil.copy(REPO / "configs" / "demo.yaml", root / "configs" / "demo.yaml")
    world = make_synthetic_world(root / "demo_data" / "world", num_videos=12, seed=0, frames=8, size=32)
    init_model(root / "demo_data" / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    return root


def _tokens(store_path: Path) -> dict[str, np.ndarray]:
    from cache.store import FeatureStore

    store = FeatureStore.open(store_path)
    return {v: np.asarray(store.read(v)) for v in sorted(store.done_ids())}


@pytest.mark.slow
def test_the_readme_cluster_steps_work_from_any_directory(cluster, project):
    in_process = _vidcap(
        project, "extract", "--config", "configs/demo.yaml", "--set", "run.output_dir=runs/local"
    )
    distributed = _vidcap(
        project, "extract", "--config", "configs/demo.yaml", "--set", f"extract.scheduler={cluster}"
    )
    assert (
        distributed["mode"].startswith("dask: 2 workers") and distributed["done"] == in_process["done"] == 12
    )
    local, remote = (
        _tokens(project / "runs/local/extract/features.zarr"),
        _tokens(project / "runs/demo/extract/features.zarr"),
    )
    assert local.keys() == remote.keys() and len(local) == 12
    for video in local:
        np.testing.assert_allclose(remote[video], local[video], rtol=0, atol=2e-3)

    caption = [
        "caption",
        "demo_data/world/videos",
        "--model",
        "demo_data/tiny-t5",
        "--config",
        "configs/demo.yaml",
    ]
    _vidcap(project, *caption, "--out", "runs/local/captions.jsonl")
    summary = _vidcap(
        project, *caption, "--out", "runs/demo/captions.jsonl", "--set", f"caption.scheduler={cluster}"
    )
    assert summary["captioned"] == 12 and summary["errors"] == 0

    def captions(path):
        return {r["video"]: r["caption"] for r in map(json.loads, (project / path).read_text().splitlines())}

    assert captions("runs/demo/captions.jsonl") == captions("runs/local/captions.jsonl")
