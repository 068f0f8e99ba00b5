"""Fast CIDEr-D (`pipeline.cider`) against pycocoevalcap's pure-Python CIDEr-D."""

from __future__ import annotations

import random
import shutil
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook

from pipeline.cider import CiderD, DocumentFrequency, cider_d_reward, simple_tokenize

VOCAB = ["a", "man", "dog", "is", "runs", "the", "red", "car"]  # small: n-grams repeat


def random_caption(rng: random.Random, min_words: int = 0, max_words: int = 9) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(min_words, max_words)))


def random_corpus(rng: random.Random, videos: int) -> tuple[dict, dict]:
    """gts with 1-6 refs per video (some duplicated), res with empty / one-word candidates."""
    gts = {}
    for i in range(videos):
        refs = [random_caption(rng, 1) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            refs.append(refs[0])
        gts[f"v{i}"] = refs
    res = {v: [random_caption(rng, rng.choice([0, 1, 1, 2, 5]))] for v in gts}
    return gts, res


def reference_cider_d(df: dict, num_docs: int, cand: str, refs: list[str], sigma: float = 6.0) -> float:
    """CIDEr-D of one candidate with a given df, transcribed from pycocoevalcap's CiderScorer."""
    log_n = np.log(float(num_docs))

    def vectors(text):
        vec, norm = [defaultdict(float) for _ in range(4)], [0.0] * 4
        for ngram, tf in precook(text).items():
            vec[len(ngram) - 1][ngram] = tf * (log_n - np.log(max(1.0, df.get(ngram, 0.0))))
            norm[len(ngram) - 1] += vec[len(ngram) - 1][ngram] ** 2
        return vec, np.sqrt(norm), max(len(text.split()) - 1, 0)

    vec, norm, length = vectors(cand)
    total = np.zeros(4)
    for ref in refs:
        vec_ref, norm_ref, length_ref = vectors(ref)
        for n in range(4):
            val = sum(min(v, vec_ref[n][g]) * vec_ref[n][g] for g, v in vec[n].items())
            if norm[n] != 0 and norm_ref[n] != 0:
                val /= norm[n] * norm_ref[n]
            total[n] += val * np.e ** (-((length - length_ref) ** 2) / (2 * sigma**2))
    return float(np.mean(total) / len(refs) * 10.0)


def reference_df(corpus: dict[str, list[str]]) -> dict:
    df: dict = defaultdict(float)
    for refs in corpus.values():
        for ngram in {g for ref in refs for g in precook(ref)}:
            df[ngram] += 1
    return df


@pytest.mark.parametrize("seed", range(6))
def test_compute_score_equals_pycocoevalcap(seed):
    rng = random.Random(seed)
    gts, res = random_corpus(rng, videos=rng.choice([2, 5, 30]))
    expected, expected_each = Cider().compute_score(gts, res)
    score, each = CiderD().compute_score(gts, res)
    assert score == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(each, expected_each, rtol=0, atol=1e-9)
    assert expected > 0  # the corpora are built so that some n-grams do match


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.text(alphabet="abc ", max_size=12), min_size=1, max_size=4),
            st.text(alphabet="abc ", max_size=12),
        ),
        min_size=2,
        max_size=6,
    )
)
def test_compute_score_equals_pycocoevalcap_property(videos):
    gts = {f"v{i}": refs for i, (refs, _) in enumerate(videos)}
    res = {f"v{i}": [cand] for i, (_, cand) in enumerate(videos)}
    if all(not ref.split() for refs in gts.values() for ref in refs):
        return  # pycocoevalcap itself fails on a corpus without a single reference word
    expected, expected_each = Cider().compute_score(gts, res)
    score, each = CiderD().compute_score(gts, {v: c[0] for v, c in res.items()})
    assert score == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(each, expected_each, rtol=0, atol=1e-9)


def test_single_video_scores_zero():
    gts = {"only": ["a man runs", "a man is running"]}
    assert Cider().compute_score(gts, {"only": ["a man runs"]})[0] == 0.0
    score, each = CiderD().compute_score(gts, {"only": "a man runs"})
    assert score == 0.0 and each.tolist() == [0.0]


def test_score_candidates_with_corpus_df_matches_reference():
    rng = random.Random(7)
    train = {f"t{i}": [random_caption(rng, 1) for _ in range(5)] for i in range(40)}
    refs = {f"e{i}": [random_caption(rng, 1) for _ in range(rng.randint(1, 4))] for i in range(8)}
    df = DocumentFrequency.from_references(train)
    scorer = CiderD(refs, df=df)
    video_ids = [v for v in refs for _ in range(3)]
    # unknown words and n-grams in neither corpus must count in the candidate's norm
    cands = [random_caption(rng) + rng.choice(["", " zebra", " zebra zebra quokka"]) for _ in video_ids]
    got = scorer.score_candidates(video_ids, cands)
    expected = [
        reference_cider_d(reference_df(train), len(train), c, refs[v])
        for v, c in zip(video_ids, cands, strict=True)
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert np.count_nonzero(got) > len(got) // 2


def test_training_refs_scorer_and_its_compute_score_use_the_corpus_df():
    rng = random.Random(3)
    train = {f"t{i}": [random_caption(rng, 1) for _ in range(4)] for i in range(25)}
    scorer = CiderD(train)
    video_ids = list(train)[:5] * 2
    cands = [random_caption(rng) for _ in video_ids]
    df = reference_df(train)
    expected = [reference_cider_d(df, len(train), c, train[v]) for v, c in zip(video_ids, cands, strict=True)]
    np.testing.assert_allclose(scorer.score_candidates(video_ids, cands), expected, rtol=0, atol=1e-9)
    gts = {v: train[v] for v in list(train)[:5]}
    _, each = scorer.compute_score(gts, {v: cands[i] for i, v in enumerate(gts)})
    np.testing.assert_allclose(each, expected[:5], rtol=0, atol=1e-9)


def test_save_load_round_trip(tmp_path):
    rng = random.Random(11)
    train = {f"t{i}": [random_caption(rng, 1) for _ in range(3)] for i in range(20)}
    scorer = CiderD(train)
    scorer.save(tmp_path / "df.npz")
    with np.load(tmp_path / "df.npz", allow_pickle=False) as data:  # plain arrays, no pickle
        assert int(data["num_docs"]) == 20
    loaded = CiderD.load(tmp_path / "df.npz", references=train)
    video_ids, cands = list(train), [random_caption(rng) for _ in train]
    np.testing.assert_array_equal(
        loaded.score_candidates(video_ids, cands), scorer.score_candidates(video_ids, cands)
    )


def test_cider_d_reward_baselines():
    rng = random.Random(5)
    train = {f"t{i}": [random_caption(rng, 2) for _ in range(4)] for i in range(10)}
    scorer = CiderD(train)
    video_ids = ["t0", "t1", "t2"]
    samples = [[random_caption(rng, 2) for _ in range(4)] for _ in video_ids]
    reward, advantage = cider_d_reward(scorer, video_ids, samples)
    assert reward.shape == advantage.shape == (3, 4)
    np.testing.assert_allclose(advantage.sum(axis=1), 0.0, atol=1e-12)  # leave-one-out mean
    np.testing.assert_allclose(reward[1], scorer.score_candidates(["t1"] * 4, samples[1]))
    greedy = [train[v][0] for v in video_ids]
    _, advantage = cider_d_reward(scorer, video_ids, samples, baselines=greedy)
    np.testing.assert_allclose(advantage, reward - scorer.score_candidates(video_ids, greedy)[:, None])


def test_errors_name_the_problem():
    scorer = CiderD({"v": ["a man"], "w": ["a dog"]})
    with pytest.raises(KeyError, match="nope"):
        scorer.score_candidates(["nope"], ["a man"])
    with pytest.raises(ValueError, match="2 video ids but 1"):
        scorer.score_candidates(["v", "w"], ["a man"])
    with pytest.raises(ValueError, match="'v'"):
        CiderD({"v": []})
    with pytest.raises(ValueError, match="no references registered"):
        CiderD().score_candidates(["v"], ["a"])


def test_simple_tokenize_examples():
    assert simple_tokenize("A man's dog, running (fast).") == "a man 's dog running -lrb- fast -rrb-"
    assert simple_tokenize("She doesn't \"smile\"; they can't!") == "she does n't smile they ca n't"
    assert simple_tokenize("a t-shirt costs $5 - 3.5 % off...") == "a t-shirt costs $ 5 3.5 % off"


PLAIN_CAPTIONS = [
    "A man is playing a guitar.",
    "a woman's hands are cutting onions, carrots and peppers",
    "Two kids don't want to go; they're crying!",
    "someone is driving a red car (very fast) on the highway.",
    'a girl says "hello" to the camera?',
    "a cat -- black and white -- jumps on a t-shirt at 3.5 seconds",
    "the people aren't dancing: they're walking...",
    "A Dog's life is being shown & discussed.",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for the PTB tokenizer")
def test_simple_tokenize_matches_ptb_on_plain_captions():
    from pipeline.metrics import ptb_tokenize

    ptb = ptb_tokenize({i: [c] for i, c in enumerate(PLAIN_CAPTIONS)})
    assert [simple_tokenize(c) for c in PLAIN_CAPTIONS] == [ptb[i][0] for i in range(len(PLAIN_CAPTIONS))]
