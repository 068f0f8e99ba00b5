"""How sure the model is of a caption: what makes `vidcap caption`'s output a filterable training set.

For each video, `captions_with_confidence` returns the caption that beam search (or greedy
decoding) picks and:

* ``mean_logprob``: the mean over its tokens (EOS included) of log p(token | video, prompt,
  earlier tokens), re-scored teacher-forced under the distribution generation used (no EOS before
  `min_new_tokens`); ``confidence`` = exp(mean_logprob), the geometric-mean token probability,
  in (0, 1];
* ``beam_agreement`` (beam search only): how much the top-k beams agree, the mean over pairs of
  beams of their word overlap (Dice: 2 |A n B| / (|A| + |B|) over word multisets), in [0, 1].
  Beam search computes the k beams anyway; returning them all costs only their decoding.

`pipeline.annotations.read_captions_jsonl` reads the records back as a training set and keeps
those above a threshold or the top fraction (`data.train_sets[].filter`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch


def word_overlap(a: str, b: str) -> float:
    """Dice coefficient of the two captions' word multisets: 1 for the same words, 0 for none shared."""
    wa, wb = Counter(a.split()), Counter(b.split())
    total = sum(wa.values()) + sum(wb.values())
    return 2 * sum((wa & wb).values()) / total if total else 1.0


def beam_agreement(beams: Sequence[str]) -> float:
    """Mean pairwise `word_overlap` of a video's top-k beams (1.0 for a single beam)."""
    pairs = list(itertools.combinations(beams, 2))
    return sum(word_overlap(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0


@torch.no_grad()
def captions_with_confidence(
    model: Any, frame_tokens: torch.Tensor, num_beams: int, max_new_tokens: int, min_new_tokens: int
) -> list[dict[str, Any]]:
    """`[{"caption", "confidence", "mean_logprob"[, "beam_agreement"]}]`, one per video of (B, T, L, D)."""
    k = num_beams
    out = model.generate(
        frame_tokens,
        num_beams=k,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_return_sequences=k,
    )  # video-major: k beams per video, best first
    chosen = out.token_ids[::k]  # (B, S)
    logprob = model.sequence_logprobs(frame_tokens, chosen, min_new_tokens=min_new_tokens)  # (B,)
    eos = (chosen == model.tokenizer.eos_token_id).long()
    lengths = ((eos.cumsum(dim=1) - eos) == 0).sum(dim=1).clamp(min=1)  # tokens through the first EOS
    results = []
    for i, (total, length) in enumerate(zip(logprob.tolist(), lengths.tolist(), strict=True)):
        mean = total / length
        record = {
            "caption": out.texts[i * k],
            "confidence": round(math.exp(mean), 6),
            "mean_logprob": round(mean, 6),
        }
        if k > 1:
            record["beam_agreement"] = round(beam_agreement(out.texts[i * k : (i + 1) * k]), 6)
        results.append(record)
    return results
