"""What a training run logs: `metrics.jsonl`, TensorBoard events, and `curves.png`.

Records are `{"kind": "step" | "epoch", "step", ...}`; the PNG shows training loss (and SCST
reward) per step and validation CIDEr per epoch, the curves the paper's figures show.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from pipeline.runtime.files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricsLog:
    """`metrics.jsonl` (+ TensorBoard) on rank 0; on resume, records past the checkpoint are dropped."""

    def __init__(self, stage_dir: Path, enabled: bool, resume_step: int | None):
        self.path = stage_dir / METRICS_FILE
        self.curves = stage_dir / CURVES_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r["step"] <= resume_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=purge)
        except Exception:  # tensorboard not installed: the jsonl and the png still have everything
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tb.flush()

    def plot(self) -> None:
        if self.enabled:
            plot_curves(read_metrics(self.path), self.curves)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], out: Path) -> None:
    """Training loss (per logged step and per epoch), reward when present, validation CIDEr per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    panels = ["loss"] + (["reward"] if any("reward" in r for r in steps) else []) + ["val_cider"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, key in zip(axes, panels, strict=True):
        if key == "val_cider":
            ax.plot([r["epoch"] for r in epochs], [r["val_cider"] for r in epochs], "o-")
            ax.set_xlabel("epoch (0: starting model)")
            ax.set_title("validation CIDEr-D (greedy)")
            continue
        ax.plot(
            [r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], lw=1, label="steps"
        )
        if key == "loss":
            trained = [r for r in epochs if r.get("train_loss") is not None]
            ax.plot(
                [r["step"] for r in trained], [r["train_loss"] for r in trained], "o-", label="epoch mean"
            )
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_title(f"training {key}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
