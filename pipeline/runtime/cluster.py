"""Dask plumbing shared by `extract` and `caption`: a client, and a model cache per worker.

Both stages split their videos into chunks, send each chunk to a worker as one task, and
let the task write its results (cache entries, caption part files) straight to disk; only a
small status per video travels back. Three modes, chosen by two config keys:

* `workers: 0`, `scheduler: ""`: no Dask, everything runs in this process;
* `workers: N`: a local cluster of N worker processes with one thread each, each pinned
  to one GPU (round robin over the visible GPUs) through `CUDA_VISIBLE_DEVICES`;
* `scheduler: tcp://host:8786`: a cluster you started yourself, one worker per GPU:

      dask scheduler                                  # on the head node (port 8786)
      # on every GPU machine, once per GPU i:
      CUDA_VISIBLE_DEVICES=$i dask worker tcp://head:8786 --nworkers 1 --nthreads 1 \
          --memory-limit 0 --name $(hostname)-gpu$i &

  (`dask-cuda-worker tcp://head:8786` from dask-cuda does the same, one worker per GPU.)
  `--memory-limit 0`: Dask's default limit (RAM x threads / cores) is far below what loading
  a BLIP-2 takes, and the nanny would kill the worker. Every worker needs vidcap installed
  and the same paths (videos, cache or caption output, model) on a shared filesystem: tasks
  write their results there themselves. Stages send workers a config whose paths are
  absolute (`Config.with_absolute_paths`), and check first that each worker sees the
  shared paths (`require_shared_paths`), so workers may run from any directory.

A worker loads its model once: `worker_cached(key, load)` keeps it in a per-process dict, so
every later task on that worker reuses it.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import torch

from pipeline.errors import StageError
from pipeline.runtime.stage import progress

T = TypeVar("T")

# Local workers are processes (real parallelism, one CUDA device each). Tests set this to False:
# threads of the calling process start in a second instead of re-importing torch per worker.
LOCAL_WORKER_PROCESSES = True
REMOTE_WORKER_WAIT_S = 300

_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()


@contextlib.contextmanager
def dask_client(workers: int = 0, scheduler: str = "", processes: bool | None = None) -> Iterator[Any]:
    """A `distributed.Client` for `scheduler` or a local cluster of `workers`, or None (in-process).

    Local workers are processes (`processes=False`: threads of this process; default
    `LOCAL_WORKER_PROCESSES`) with one thread each; with GPUs, worker i sees only GPU i mod
    #GPUs. With no GPU, each worker's torch gets an equal share of the CPU cores.
    """
    if not scheduler and workers <= 0:
        yield None
        return
    from distributed import Client

    if scheduler:
        with Client(scheduler, timeout="60s") as client:
            try:
                client.wait_for_workers(1, timeout=REMOTE_WORKER_WAIT_S)
            except TimeoutError:
                raise RuntimeError(
                    f"no Dask worker joined {scheduler} within {REMOTE_WORKER_WAIT_S} s; "
                    "start one per GPU with `dask worker ADDRESS --nworkers 1 --nthreads 1`"
                ) from None
            yield client
        return
    processes = LOCAL_WORKER_PROCESSES if processes is None else processes
    with _local_cluster(workers, processes) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=300)
        yield client


def describe_client(client: Any) -> str:
    """`in-process`, or `dask: N workers at ADDRESS (dashboard URL)`, for logs and summaries."""
    if client is None:
        return "in-process"
    return f"dask: {len(client.nthreads())} workers at {client.scheduler.address} (dashboard {client.dashboard_link})"


def _local_cluster(workers: int, processes: bool) -> Any:
    from distributed import Nanny, Scheduler, SpecCluster, Worker

    gpus = _visible_gpus()
    cpu_share = max(1, (os.cpu_count() or 1) // workers)
    specs = {}
    for i in range(workers):
        # No memory limit: Dask's default (RAM x threads / cores) would kill a worker loading a
        # multi-GB BLIP-2 on a machine with many cores and one thread per worker.
        options: dict[str, Any] = {"nthreads": 1, "name": i, "memory_limit": 0}
        if processes:
            # torch reads these at import; Dask's default (1 thread) would waste CPU-only machines.
            env = {"OMP_NUM_THREADS": str(cpu_share), "MKL_NUM_THREADS": str(cpu_share)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            options["env"] = env
            options["silence_logs"] = logging.WARNING
        specs[i] = {"cls": Nanny if processes else Worker, "options": options}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}}
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING, name="vidcap")


def _visible_gpus() -> list[str]:
    """GPU ids this process may hand out to workers (respects the caller's CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA runtime at all
        return []


def worker_cached(key: tuple[Hashable, ...], load: Callable[[], T]) -> T:
    """The object `load()` returned the first time this process asked for `key` (a model, say).

    `key[0]` names its kind ("vit", "captioner"): one object of a kind is kept per process, so a
    long-lived worker that serves runs with other settings holds the latest model, not all of them.
    """
    with _CACHE_LOCK:
        if key not in _CACHE:
            _drop(lambda cached: cached[0] == key[0])
            _CACHE[key] = load()
        return _CACHE[key]


def release_cached(kind: Hashable) -> None:
    """Drop this process's cached objects of `kind` (a stage done with its model frees the GPU)."""
    with _CACHE_LOCK:
        _drop(lambda cached: cached[0] == kind)


def _drop(matches: Callable[[tuple[Hashable, ...]], bool]) -> None:
    """Remove matching entries (the lock held) and return their GPU memory to the driver."""
    stale = [k for k in _CACHE if matches(k)]
    for k in stale:
        del _CACHE[k]
    if stale:
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def configure_torch_threads() -> None:
    """Inside a Dask worker process, let torch use the cores `dask_client` gave it."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and _in_dask_worker():
        torch.set_num_threads(max(1, int(threads)))


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def split_chunks(items: Sequence[T], chunk_size: int) -> list[list[T]]:
    """`items` cut into consecutive lists of at most `chunk_size`."""
    chunk_size = max(1, chunk_size)
    return [list(items[i : i + chunk_size]) for i in range(0, len(items), chunk_size)]


def chunk_size_for(num_items: int, batch_size: int, num_workers: int) -> int:
    """Tasks big enough to keep a worker's batches full, small enough to balance and lose little.

    A task is a few ViT batches; with several workers there are at least ~4 tasks per worker
    so a slow worker does not hold up the end, and a killed task costs little to redo.
    """
    if num_workers <= 0:
        return max(1, num_items)
    per_worker = -(-num_items // (4 * num_workers))
    return max(1, min(8 * batch_size, max(batch_size, per_worker)))


def prefetch_map(
    pool: Executor, fn: Callable[[Any], T], items: Iterable[Any], ahead: int
) -> Iterator[tuple[T, float]]:
    """`(fn(item), seconds waited for it)` in order, computing up to `ahead` items ahead in `pool`.

    How both stages overlap decoding (threads) with the model: the bound keeps memory flat
    however long the list, and the waiting time says whether decoding is the bottleneck.
    """
    queue = iter(items)
    futures = collections.deque(pool.submit(fn, item) for item in itertools.islice(queue, max(1, ahead)))
    while futures:
        started = time.perf_counter()
        result = futures.popleft().result()
        waited = time.perf_counter() - started
        for item in itertools.islice(queue, 1):
            futures.append(pool.submit(fn, item))
        yield result, waited


def on_every_worker(client: Any, fn: Callable[..., T], *args: Any) -> list[T]:
    """`fn(*args)` once on each worker (in-process: here), e.g. to load the model before the clock starts."""
    if client is None:
        return [fn(*args)]
    futures = [
        client.submit(fn, *args, workers=[w], allow_other_workers=False, pure=False)
        for w in client.nthreads()
    ]
    return client.gather(futures)


def require_shared_paths(client: Any, paths: dict[str, str], log: Any) -> None:
    """Every worker must see `paths` ({what: absolute path}): logged, then checked on each worker.

    A worker started elsewhere sees the driver's files only through a shared filesystem; one that
    cannot see a path fails here with one line per worker and path, not later in every task.
    """
    if client is None:
        return
    wanted = {what: path for what, path in paths.items() if path}
    log.info("Dask workers must see these paths: %s", "; ".join(f"{w} {p}" for w, p in wanted.items()))
    blind = []
    for address, (name, host, cwd, missing) in sorted(client.run(_missing_paths, wanted).items()):
        blind += [
            f"worker {name} ({address}, host {host}, cwd {cwd}) cannot see the {w} {p}" for w, p in missing
        ]
    if blind:
        raise StageError(
            "; ".join(blind) + ". Put these paths on a filesystem every worker mounts at the same place"
        )


def _missing_paths(
    wanted: dict[str, str], dask_worker: Any = None
) -> tuple[str, str, str, list[tuple[str, str]]]:
    import socket

    missing = [(what, path) for what, path in wanted.items() if not os.path.exists(path)]
    name = str(dask_worker.name) if dask_worker is not None else "?"
    return name, socket.gethostname(), os.getcwd(), missing


def run_chunks(
    client: Any,
    fn: Callable[..., dict],
    chunks: list[list[Any]],
    *args: Any,
    on_result: Callable[[dict], None],
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Run `fn(chunk, *args)` for every chunk, on Dask when `client` is set; hand each result to `on_result`.

    In-process, `fn` also gets `on_batch=on_progress` to report videos as each batch finishes;
    on Dask, progress advances by a whole chunk when its task returns (in completion order).
    A task that fails twice (Dask retries it once, e.g. after a worker died) stops the run:
    the other tasks are cancelled and the error is raised. Tasks write their results to disk
    as they go, so a re-run resumes from there.
    """
    if client is None:
        for chunk in chunks:
            on_result(fn(chunk, *args, on_batch=on_progress))
        return
    from distributed import as_completed

    futures = {client.submit(fn, chunk, *args, pure=False, retries=1): len(chunk) for chunk in chunks}
    try:
        for future in as_completed(list(futures)):
            on_result(future.result())
            if on_progress is not None:
                on_progress(futures[future])
            future.release()
    except BaseException:
        client.cancel(list(futures))
        raise


class Tally:
    """What the tasks of one run report, added up in the driver: seconds per phase and the rate.

    `extract` and `caption` subclass it with their own counts.
    """

    def __init__(self, timers: Sequence[str], videos: int, skipped: int) -> None:
        self.videos, self.skipped = videos, skipped
        self.seconds = dict.fromkeys(timers, 0.0)
        self.started = time.time()
        self.fallbacks: collections.Counter[str] = (
            collections.Counter()
        )  # videos whose decoder fell back, by reason

    def add_seconds(self, seconds: dict[str, float]) -> None:
        for key, value in seconds.items():
            self.seconds[key] += value

    def add_fallbacks(self, reasons: dict[str, int]) -> None:
        """Count videos decoded by `pyav` because the configured backend was not exact on them."""
        self.fallbacks.update(reasons)

    def common_summary(self, mode: str, finished: int, setup_s: float, seconds: float) -> dict[str, Any]:
        """Mode, video counts, wall time, set-up time, videos/s since the work began, seconds per phase."""
        working = time.time() - self.started
        return {
            "mode": mode,
            "videos": self.videos,
            "skipped": self.skipped,
            "seconds": round(seconds, 2),
            "setup_s": round(setup_s, 2),  # starting workers and loading the model
            "videos_per_s": round(finished / working, 3) if finished and working > 0 else 0.0,
            **{k: round(v, 2) for k, v in self.seconds.items()},
            "decode_fallbacks": dict(self.fallbacks.most_common()),
        }


class progress_counter:  # noqa: N801 (used like a function: `with progress_counter(n, "extract") as bar`)
    """`pipeline.runtime.stage.progress` (rate, ETA) advanced by hand: `bar.update(n)` as items finish."""

    def __init__(self, total: int, desc: str):

        self._bar = progress(range(total), total=total, desc=desc)
        self._left = total

    def __enter__(self) -> progress_counter:
        return self

    def update(self, n: int) -> None:
        for _ in range(max(0, min(n, self._left))):
            next(self._bar, None)
        self._left -= n

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for _ in self._bar:  # run to the end so tqdm prints its final line
                pass
        self._bar.close()
