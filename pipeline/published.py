"""Published numbers to compare against, and the results table `eval` prints.

The numbers are those of the method's paper (BLIP-2 turned into a video captioner) and of
the best peer with public code (mPLUG-2). They
are on the x100 scale papers use; our metrics files keep pycocoevalcap's 0..1 scale and
`format_table` scales them. A metric the paper does not give is left out (printed `-`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

# Columns of the table: pycocoevalcap's key -> the name papers print.
TABLE_COLUMNS = {"Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}


class PublishedResult(NamedTuple):
    setting: str
    """System and setting, as the paper words it."""
    metrics: dict[str, float]
    """pycocoevalcap key names -> score x100."""
    split: str = "test"
    """Split the number was measured on."""


PUBLISHED: dict[str, list[PublishedResult]] = {
    "msrvtt": [
        PublishedResult("paper: BLIP-2 Flan-T5-XL zero-shot", {"CIDEr": 50.8}, split="val"),
        PublishedResult("paper: CE, Q-Former only, 8 frames", {"CIDEr": 73.6}),
        PublishedResult(
            "paper: LoRA + SCST, 16 frames (best)",
            {"Bleu_4": 52.4, "METEOR": 34.2, "ROUGE_L": 68.3, "CIDEr": 79.5},
        ),
        PublishedResult("peer: mPLUG-2", {"CIDEr": 80.0}),
    ],
    "msvd": [PublishedResult("paper: best", {"CIDEr": 168.0})],
    "vatex": [PublishedResult("paper: best", {"CIDEr": 87.1}, split="public test")],
}
DATASET_NAMES = {"msrvtt": "MSR-VTT", "msvd": "MSVD", "vatex": "VATEX"}


def published_results(dataset: str) -> list[PublishedResult]:
    """The published results for a dataset (`data.format`: msrvtt, msvd, vatex); [] for others."""
    return PUBLISHED.get(dataset.lower(), [])


def format_table(ours: Mapping[str, Mapping[str, float]], dataset: str = "", split: str = "") -> str:
    """A plain-text table: our models (0..1 metrics, shown x100), then the published rows for `dataset`."""
    published = published_results(dataset)
    names = list(ours) + [_published_label(r) for r in published]
    width = max([len("model"), *map(len, names)]) + 2
    header = f"{'model':<{width}}" + "".join(f"{title:>9}" for title in TABLE_COLUMNS.values())
    lines = [header, "-" * len(header)]
    for name, metrics in ours.items():
        lines.append(
            f"{name:<{width}}" + _cells({k: 100 * v for k, v in metrics.items() if k in TABLE_COLUMNS})
        )
    if published:
        lines.append("-" * len(header))
        for result in published:
            lines.append(f"{_published_label(result):<{width}}" + _cells(result.metrics))
    where = " ".join(filter(None, [DATASET_NAMES.get(dataset.lower(), ""), split]))
    lines.append(f"(scores x 100, as papers report them{'; ours on ' + where if where else ''})")
    return "\n".join(lines)


def _published_label(result: PublishedResult) -> str:
    return result.setting if result.split == "test" else f"{result.setting} ({result.split})"


def _cells(metrics: Mapping[str, float]) -> str:
    return "".join(f"{metrics[key]:>9.1f}" if key in metrics else f"{'-':>9}" for key in TABLE_COLUMNS)
