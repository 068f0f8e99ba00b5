"""The benchmark scripts still run (smoke runs on tiny models; numbers are not asserted, except bench_precision's ranking of its rules)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_run_on_cpu_prints_every_section():
    args = [sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--preset", "tiny-t5", "--device", "cpu",
            "--quick", "--frames", "2", "--batch", "2", "--caption-batches", "1,2"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("bench_gpu: tiny-t5 on cpu")
    assert any(line.startswith("extract: ") and "videos/s" in line for line in lines)
    assert any(line.startswith("train (llm frozen): cache ") and "cache/video" in line for line in lines)
    assert [line.split(":")[1].split()[1] for line in lines if line.startswith("caption: batch")] == [
        "1",
        "2",
    ]


def test_bench_decode_smoke_run_prints_every_method():
    args = [sys.executable, str(ROOT / "benchmarks/bench_decode.py"), "--clips", "1", "--seconds", "1", "1",
            "--repeat", "1", "--no-zoo"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    methods = [line.split("  ")[1].strip() for line in out.stdout.splitlines() if "videos/s/core" in line]
    assert methods == ["sequential (all frames)", "pyav T=8", "pyav T=16", "decord T=8", "decord T=16"]


@pytest.mark.slow  # ~30 s: the mid-size ViT in seven precisions
def test_bench_precision_and_bench_memory_print_their_tables():
    precision = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_precision.py"), "--frames", "1"],
                               capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert precision.returncode == 0, precision.stderr
    rows = {
        line.split("  ")[1].strip(): float(line.split()[-1]) for line in precision.stdout.splitlines()[2:]
    }
    assert rows["bfloat16: fp32 weights + autocast"] < rows["bfloat16: whole ViT in half"]  # vidcap's rule
    memory = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_memory.py")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert memory.returncode == 0, memory.stderr
    assert "COMPUTED" in memory.stdout and "from cache full LLM" in memory.stdout
