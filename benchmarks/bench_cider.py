"""Benchmark: vectorised CIDEr-D (`pipeline.cider`) against the pure-Python reference.

    python benchmarks/bench_cider.py            # full sizes (a few minutes on 2 cores)
    python benchmarks/bench_cider.py --quick    # smaller corpora, a smoke run

(a) The SCST reward call: 64 videos x 6 candidates x 20 references, df from a training corpus
    of 6513 videos x 20 synthetic references. Baselines: pycocoevalcap's CiderScorer built from
    the batch (what a naive SCST does; df from the batch, so not even the same numbers), and
    the self-critical.pytorch approach (df of the training corpus cached, but every reference
    re-cooked and re-vectorised per call, per candidate).
(b) Evaluation: 2990 videos x 20 references, pycocoevalcap `Cider` vs `CiderD().compute_score`.

Captions are synthetic: 8-15 words from a Zipf-like vocabulary of 5000 words, so that common
n-grams repeat as they do in real captions. Prints times and speed-ups; asserts agreement.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, precook

from pipeline.cider import CiderD

VOCAB_SIZE = 5000
ZIPF_EXPONENT = 1.1


def synthetic_captions(rng: np.random.Generator, count: int) -> list[str]:
    """`count` captions of 8-15 words drawn from a Zipf-like vocabulary."""
    p = 1.0 / np.arange(1, VOCAB_SIZE + 1) ** ZIPF_EXPONENT
    words = np.array([f"w{i}" for i in range(VOCAB_SIZE)], dtype=object)
    lengths = rng.integers(8, 16, count)
    drawn = words[rng.choice(VOCAB_SIZE, size=lengths.sum(), p=p / p.sum())]
    bounds = np.cumsum(lengths)
    return [" ".join(drawn[end - length : end]) for length, end in zip(lengths, bounds, strict=True)]


def synthetic_references(
    rng: np.random.Generator, videos: int, refs: int, prefix: str
) -> dict[str, list[str]]:
    captions = synthetic_captions(rng, videos * refs)
    return {f"{prefix}{i}": captions[i * refs : (i + 1) * refs] for i in range(videos)}


def self_critical_reward(
    df: dict, log_n: float, refs_per_cand: list[list[str]], cands: list[str]
) -> np.ndarray:
    """self-critical.pytorch's CiderD: cached corpus df, everything else recomputed per call.

    pycocoevalcap's CiderScorer with the df and log N injected (its compute_cider would
    recompute log N from the batch), the per-reference vectorisation left as it is.
    """
    scorer = CiderScorer(n=4, sigma=6.0)
    for cand, refs in zip(cands, refs_per_cand, strict=True):
        scorer += (cand, refs)
    scorer.document_frequency = df

    def counts2vec(cnts):
        vec, norm, length = [defaultdict(float) for _ in range(4)], [0.0] * 4, 0
        for ngram, tf in cnts.items():
            n = len(ngram) - 1
            vec[n][ngram] = float(tf) * (log_n - np.log(max(1.0, df.get(ngram, 0.0))))
            norm[n] += vec[n][ngram] ** 2
            length += tf if n == 1 else 0
        return vec, [np.sqrt(x) for x in norm], length

    scores = []
    for test, crefs in zip(scorer.ctest, scorer.crefs, strict=True):
        vec, norm, length = counts2vec(test)
        score = np.zeros(4)
        for ref in crefs:
            vec_ref, norm_ref, length_ref = counts2vec(ref)
            val = np.zeros(4)
            for n in range(4):
                for ngram in vec[n]:
                    val[n] += min(vec[n][ngram], vec_ref[n][ngram]) * vec_ref[n][ngram]
                if norm[n] != 0 and norm_ref[n] != 0:
                    val[n] /= norm[n] * norm_ref[n]
                val[n] *= np.e ** (-((length - length_ref) ** 2) / (2 * 6.0**2))
            score += val
        scores.append(np.mean(score) / len(crefs) * 10.0)
    return np.array(scores)


def corpus_df(references: dict[str, list[str]]) -> dict:
    df: dict = defaultdict(float)
    for refs in references.values():
        for ngram in {g for ref in refs for g in precook(ref)}:
            df[ngram] += 1
    return df


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def bench_reward(rng: np.random.Generator, train_videos: int, repeats: int) -> None:
    print(f"(a) SCST reward: 64 videos x 6 candidates x 20 refs; df from {train_videos} x 20 training refs")
    train = synthetic_references(rng, train_videos, 20, "train")
    start = time.perf_counter()
    scorer = CiderD(train)
    print(f"    CiderD(train refs) construction: {time.perf_counter() - start:.2f} s (once per run)")
    video_ids = [f"train{i}" for i in rng.choice(train_videos, 64, replace=False) for _ in range(6)]
    cands = synthetic_captions(rng, len(video_ids))
    refs = [train[v] for v in video_ids]

    t_ours, ours = best_of(lambda: scorer.score_candidates(video_ids, cands), repeats * 10)
    gts, res = {i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}
    t_naive, _ = best_of(lambda: Cider().compute_score(gts, res), repeats)
    df, log_n = corpus_df(train), np.log(float(train_videos))
    t_sc, theirs = best_of(lambda: self_critical_reward(df, log_n, refs, cands), repeats)
    assert np.allclose(ours, theirs, rtol=0, atol=1e-9), "self-critical style and CiderD disagree"
    print(f"    pycocoevalcap CiderScorer on the batch (naive, batch df): {t_naive * 1e3:8.1f} ms")
    print(f"    self-critical.pytorch style (cached df):                  {t_sc * 1e3:8.1f} ms")
    print(f"    CiderD.score_candidates:                                  {t_ours * 1e3:8.2f} ms")
    print(f"    speed-up: {t_naive / t_ours:.0f}x vs naive, {t_sc / t_ours:.0f}x vs self-critical style")


def bench_eval(rng: np.random.Generator, videos: int, repeats: int) -> None:
    print(f"(b) evaluation: {videos} videos x 20 refs, df from the scored set (coco-caption parity)")
    gts = synthetic_references(rng, videos, 20, "test")
    res = {
        video_id: [caption] for video_id, caption in zip(gts, synthetic_captions(rng, videos), strict=True)
    }
    t_coco, (score_coco, per_coco) = best_of(lambda: Cider().compute_score(gts, res), 1)  # slow: once
    t_ours, (score_ours, per_ours) = best_of(lambda: CiderD().compute_score(gts, res), repeats)
    assert np.allclose(per_ours, per_coco, rtol=0, atol=1e-9) and abs(score_ours - score_coco) < 1e-9
    print(f"    pycocoevalcap Cider:  {t_coco:7.2f} s   (CIDEr {score_coco:.6f})")
    print(f"    CiderD.compute_score: {t_ours:7.2f} s   (CIDEr {score_ours:.6f})")
    print(f"    speed-up: {t_coco / t_ours:.0f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small corpora: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    bench_reward(rng, train_videos=500 if args.quick else 6513, repeats=args.repeats)
    bench_eval(rng, videos=200 if args.quick else 2990, repeats=args.repeats)


if __name__ == "__main__":
    main()
