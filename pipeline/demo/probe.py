"""What the cached tokens know: linear probes of the synthetic world's facts, read from the cache.

A captioner can only state what its input carries. Before blaming the fusion or the language
model for a fact the captions get wrong, ask the cache: a logistic regression from view-0
tokens to each fact, fitted on the train split and scored on the test split, once on the tokens
in frame order (T*L*D features) and once on their mean over frames (frame order removed). A
fact the ordered probe gets right and the frame-mean probe does not (direction of motion) needs
frame order; one both get right (colour, axis) is visible in any frame. No video is decoded:
this is what the cache is for. `vidcap ablate` prints the probes under its table.

`qformer_probe` asks the next question: can the model's own fusion and Q-Former extract the
fact when supervised directly (a linear head on the query outputs instead of the language
model)? If it can, but the captions still miss the fact, the bottleneck is the signal that
flows back through the language model, not the fusion:

    vidcap probe --config configs/demo.yaml --qformer-epochs 30 [--set model.temporal_embeddings=false]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.store import FeatureStore
from pipeline.annotations import load_manifest
from pipeline.config import ConfigError
from pipeline.demo.facts import FACTS, true_facts
from pipeline.demo.synth import AXIS
from pipeline.model import VideoCaptioner

VIEWS = ("ordered", "frame_mean")
TITLES = {"color": "colour"}


def linear_probe(
    features: np.ndarray,
    labels: list[str],
    train: np.ndarray,
    steps: int = 300,
    l2: float = 1e-3,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a multinomial logistic regression `features (N, F) -> labels`.

    Fitted on the rows where `train` is True (standardised with their statistics; Adam, L2),
    scored on the others.
    """

    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = torch.as_tensor(features, dtype=torch.float32).reshape(len(labels), -1)
    fit = torch.as_tensor(train, dtype=torch.bool)
    if fit.all() or not fit.any():
        raise ValueError("linear_probe needs both training and held-out rows")
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], len(classes), generator=generator)).requires_grad_()
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    x_fit, y_fit = x[fit], y[fit]
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x_fit @ weight + bias, y_fit) + l2 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[~fit] @ weight + bias).argmax(1) == y[~fit]).float().mean())


def probe_cache(
    store_path: str | Path,
    facts: Mapping[str, Mapping[str, str]],
    splits: Mapping[str, str],
    held_out: str = "test",
) -> dict[str, dict[str, float]]:
    """`{"ordered": {fact: accuracy}, "frame_mean": {...}}` for the done videos with known facts."""
    ids, tokens = _labelled_tokens(store_path, facts, splits, held_out)
    train = np.array([splits[v] == "train" for v in ids])
    features = {"ordered": tokens, "frame_mean": tokens.mean(axis=1)}
    result: dict[str, dict[str, float]] = {}
    for view in VIEWS:
        result[view] = {}
        for fact in FACTS:
            labels = [_fact(facts[v], fact) for v in ids]
            result[view][fact] = linear_probe(features[view], labels, train)
    return result


def true_facts_and_splits(config: Any) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The synthetic world's facts and each video's split, for a config's data."""

    facts = true_facts(config)
    if not facts:
        raise ConfigError(
            f"{config.data.annotations}: no synthetic-world facts to probe (see pipeline.demo.synth)"
        )
    return facts, {r.video_id: r.split for r in load_manifest(config.data).records}


def _fact(facts: Mapping[str, str], name: str) -> str:
    return AXIS[facts["direction"]] if name == "axis" else facts[name]


def format_probe_table(probes: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One line per (cache, view): held-out accuracy x 100 of each fact."""
    width = max([len("cache tokens"), *(len(f"{name} {view}") for name in probes for view in VIEWS)]) + 2
    header = f"{'cache tokens':<{width}}" + "".join(f"{TITLES.get(fact, fact):>11}" for fact in FACTS)
    lines = [header, "-" * len(header)]
    for name, result in probes.items():
        for view in VIEWS:
            cells = "".join(f"{100 * result[view][fact]:>11.1f}" for fact in FACTS)
            lines.append(f"{f'{name} {view}':<{width}}{cells}")
    lines.append(
        "(linear probes on view-0 tokens, train -> test split: what the cache carries, whatever the "
        "captioner learns; chance: direction 25, axis 50)"
    )
    return "\n".join(lines)


def probe_ablation_caches(configs: list[Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Probes of each distinct cache among the variants' configs, by store name; {} without facts."""
    probes: dict[str, dict[str, dict[str, float]]] = {}
    for config in configs:
        name = Path(config.cache_path).stem  # `<T>f-<hash>`
        if name in probes or not true_facts(config) or not Path(config.cache_path).exists():
            continue
        probes[name] = probe_cache(config.cache_path, *true_facts_and_splits(config))
    return probes


def qformer_probe(config: Any, fact: str = "direction", epochs: int = 30, held_out: str = "val") -> float:
    """Held-out accuracy of `fact` from the config's model (fusion, temporal embeddings, Q-Former,
    queries, projection; the language model unused) with a linear head on its projected query
    outputs (the language model's visual prefix), trained on the
    cached view-0 tokens of the train split (AdamW, `train.lr`, `train.batch_size`, `run.seed`)."""

    facts, splits = true_facts_and_splits(config)
    ids, cached = _labelled_tokens(config.cache_path, facts, splits, held_out)
    tokens = torch.from_numpy(cached)  # (N, T, L, D)
    classes = sorted({_fact(facts[v], fact) for v in ids})
    labels = torch.tensor([classes.index(_fact(facts[v], fact)) for v in ids])
    train = [i for i, v in enumerate(ids) if splits[v] == "train"]
    test = [i for i, v in enumerate(ids) if splits[v] == held_out]
    torch.manual_seed(config.run.seed)
    model = VideoCaptioner.from_pretrained(config.model.pretrained, config.model, load_vision=False)
    with torch.no_grad():
        width = model.query_outputs(tokens[:1]).flatten(1).shape[1]  # Q * H_llm
    head = torch.nn.Linear(width, len(classes))
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "language_model" not in n]
    optimizer = torch.optim.AdamW([*trained, *head.parameters()], lr=config.train.lr)

    def logits(rows: list[int]) -> torch.Tensor:
        return head(model.query_outputs(tokens[rows]).flatten(1))  # (B, Q, H) -> (B, classes)

    model.train()
    generator = torch.Generator().manual_seed(config.run.seed)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), config.train.batch_size):
            rows = [train[i] for i in order[start : start + config.train.batch_size]]
            loss = torch.nn.functional.cross_entropy(logits(rows), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((logits(test).argmax(1) == labels[test]).float().mean())


def _labelled_tokens(
    store_path: str | Path, facts: Mapping[str, Any], splits: Mapping[str, str], held_out: str
) -> tuple[list[str], np.ndarray]:
    """Ids and float32 view-0 tokens (N, T, L, D) of the done train and `held_out` videos with facts."""

    if not Path(store_path).exists():
        raise FileNotFoundError(f"no feature cache at {store_path}: run the extract stage first")
    store = FeatureStore.open(store_path)
    wanted = ("train", held_out)
    ids = [v for v in store.video_ids if v in facts and splits.get(v) in wanted and store.is_done(v)]
    in_train = [splits[v] == "train" for v in ids]
    if not any(in_train) or all(in_train):
        raise ValueError(f"{store_path}: needs done videos of both the train and the {held_out} split")
    return ids, store.read(ids, 0).astype(np.float32)
