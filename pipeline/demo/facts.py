"""What the synthetic world's captions state: each video's true facts, and how often predictions get them right."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pipeline.config import Config
from pipeline.demo.synth import AXIS, parse_facts, read_facts

FACTS = ("direction", "axis", "color", "shape")


def true_facts(config: Config) -> dict[str, dict[str, str]]:
    """`{video_id: facts}` of a synthetic world's annotations; {} for data without facts."""
    if config.data.format != "jsonl":
        return {}
    try:
        return read_facts(config.data.annotations)
    except (OSError, KeyError, json.JSONDecodeError):
        return {}


def order_word_accuracy(
    predictions: Sequence[Mapping[str, str]], facts: Mapping[str, Mapping[str, str]]
) -> dict[str, float | None]:
    """Fraction of predicted captions stating each fact right: `{direction, axis, color, shape}_acc`.

    Direction needs frame order; axis (horizontal or vertical), colour and shape are visible in
    any single frame. A caption that states no direction (or colour, ...) counts as wrong for it.
    Videos without known facts are left out; all None when no video has them.
    """
    scored = [
        (parse_facts(p["caption"]), facts[p["video_id"]]) for p in predictions if p["video_id"] in facts
    ]
    if not scored:
        return {f"{name}_acc": None for name in FACTS}
    right = dict.fromkeys(FACTS, 0)
    for said, truth in scored:
        for name in ("direction", "color", "shape"):
            right[name] += said[name] == truth[name]
        right["axis"] += AXIS.get(said["direction"] or "") == AXIS[truth["direction"]]
    return {f"{name}_acc": right[name] / len(scored) for name in FACTS}
