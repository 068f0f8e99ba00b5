"""CIDEr-D exactly as coco-caption (pycocoevalcap `Cider`) computes it, but vectorised.

pycocoevalcap's "CIDEr" is CIDEr-D. For a candidate c and the references r_1..r_m of its video:

    g_n(x)     = tf-idf vector of the n-grams of x: tf * (log N - log(max(1, df)))
    sim_n(c,r) = sum_g min(g_n(c)[g], g_n(r)[g]) * g_n(r)[g] / (|g_n(c)| |g_n(r)|)
                 * exp(-(len(c) - len(r))^2 / (2 sigma^2))
    CIDEr-D(c) = 10 / m * sum_r mean_{n=1..4} sim_n(c, r)

df counts the videos whose reference set holds the n-gram, N is the number of those videos and
"len" is a caption's bigram count (words - 1: pycocoevalcap sums the bigram counts). Captions
are token strings, already PTB-tokenised (`pipeline.metrics.ptb_tokenize`) or, for SCST
rewards without java, tokenised with `simple_tokenize`.

Where the reference implementation walks Python dicts n-gram by n-gram, here n-grams are
interned to integer ids once (`DocumentFrequency`), every reference's tf-idf vector is built
once at construction, and a batch of candidates is scored with a fixed number of numpy calls:
a sorted-key join of candidate n-grams against the references of their videos, then sums by
`bincount`.

    scorer = CiderD(train_refs)                               # df from the training references
    rewards = scorer.score_candidates(video_ids, samples)     # (len(samples),)
    score, per_video = CiderD().compute_score(gts, res)       # == pycocoevalcap Cider
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import numpy as np

__all__ = ["CiderD", "DocumentFrequency", "cider_d_reward", "simple_tokenize"]

# --------------------------------------------------------------------------------------------
# N-gram interning: words get ids from a dict; a (k+1)-gram is the pair (id of its k-gram
# prefix, id of its last word), stored as the int64 key prefix * V + word in a sorted table
# whose positions are the (k+1)-gram ids. Every prefix of a known n-gram is known, so a
# lookup walks up the levels with one searchsorted per level.
# --------------------------------------------------------------------------------------------


@dataclass
class _Occurrences:
    """Every n-gram occurrence in a list of captions: its caption, level (n - 1) and id."""

    owner: np.ndarray  # (M,) caption index
    ids: np.ndarray  # (M,) n-gram id; ids >= the index size are n-grams the index does not know
    lengths: np.ndarray  # (C,) words per caption
    bounds: np.ndarray  # (2n,) first id of each level: the known ones, then the unknown ones

    def level_of(self, ids: np.ndarray) -> np.ndarray:
        return (np.searchsorted(self.bounds, ids, side="right") - 1) % (len(self.bounds) // 2)


def _split(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    tokens = [caption.split() for caption in captions]
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    return list(chain.from_iterable(tokens)), lengths


def _words_left(lengths: np.ndarray) -> np.ndarray:
    """For each token of the flattened captions, how many tokens its caption has from it on."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(lengths, lengths) - (np.arange(len(starts)) - starts)


# Sort-based set operations on int64 arrays (np.unique's hash path is slow on these sizes).
def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    first = np.ones(len(sorted_values), dtype=bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    return first


def _unique(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values)
    return ordered[_run_starts(ordered)]


def _unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ordered = np.sort(values)
    starts = np.flatnonzero(_run_starts(ordered))
    return ordered[starts], np.diff(starts, append=len(ordered))


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(values)
    ordered = values[order]
    first = _run_starts(ordered)
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, stop) for each pair."""
    lengths = stops - starts
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


@dataclass
class DocumentFrequency:
    """Document frequencies of n-grams over a reference corpus (one document = one video).

    `counts[k][i]` is how many videos have the (k+1)-gram with id i in one of their references;
    `num_docs` is the number of videos (N; idf = log N - log(max(1, df))).
    """

    words: list[str]
    keys: list[np.ndarray]  # keys[k], k >= 1: sorted prefix_id * len(words) + word_id
    counts: list[np.ndarray]  # counts[k]: (number of (k+1)-grams,) int64
    num_docs: int

    def __post_init__(self):
        self.word_ids = {word: i for i, word in enumerate(self.words)}

    @property
    def n(self) -> int:
        return len(self.counts)

    @classmethod
    def empty(cls, n: int) -> DocumentFrequency:
        return cls([], [np.zeros(0, np.int64)] * n, [np.zeros(0, np.int64)] * n, 0)

    @classmethod
    def from_references(cls, references: Mapping[str, Sequence[str]], n: int = 4) -> DocumentFrequency:
        """df of every n-gram (n = 1..n) of the references, counted once per video."""
        return _count_documents(*_flatten_references(references), n)[0]

    def extended(self, captions: Sequence[str]) -> tuple[DocumentFrequency, _Occurrences]:
        """A copy that also knows the n-grams of `captions` (their df 0), and their occurrences."""
        flat, lengths = _split(captions)
        word_ids = dict(self.word_ids)
        for word in flat:
            word_ids.setdefault(word, len(word_ids))
        old_v, v = len(self.words), len(word_ids)
        word_id = np.fromiter(map(word_ids.__getitem__, flat), dtype=np.int64, count=len(flat))
        left = _words_left(lengths)
        keys, counts = [np.zeros(0, np.int64)], [np.zeros(v, np.int64)]
        counts[0][:old_v] = self.counts[0]
        remap = np.arange(old_v)  # old id -> new id, previous level
        pos, ids = np.arange(len(flat)), word_id
        levels = [(pos, ids)]
        for k in range(1, self.n):
            # Appending words keeps word ids and the order of old keys, so old keys stay sorted.
            old_keys = remap[self.keys[k] // max(old_v, 1)] * v + self.keys[k] % max(old_v, 1)
            sel = left[pos] > k
            pos, prefix = pos[sel], ids[sel]
            table, inverse = _unique_inverse(np.concatenate([old_keys, prefix * v + word_id[pos + k]]))
            remap, ids = inverse[: len(old_keys)], inverse[len(old_keys) :]
            keys.append(table)
            counts.append(np.zeros(len(table), np.int64))
            counts[k][remap] = self.counts[k]
            levels.append((pos, ids))
        index = DocumentFrequency(list(word_ids), keys, counts, self.num_docs)
        return index, index._occurrences(levels, lengths, [len(c) for c in counts])

    def lookup(self, captions: Sequence[str]) -> _Occurrences:
        """Occurrences of the captions' n-grams; unknown n-grams get ids >= the index size
        (distinct per distinct n-gram, valid for this call only)."""
        flat, lengths = _split(captions)
        v = len(self.words)
        word_id = np.fromiter(map(self.word_ids.get, flat, repeat(-1)), dtype=np.int64, count=len(flat))
        unknown = np.flatnonzero(word_id < 0)
        new_words: dict[str, int] = {}
        if len(unknown):
            word_id[unknown] = [v + new_words.setdefault(flat[i], len(new_words)) for i in unknown]
        m = v + len(new_words)  # bound on this call's word ids
        left = _words_left(lengths)
        pos, ids = np.arange(len(flat)), word_id
        levels, sizes = [(pos, ids)], [m]
        for k in range(1, self.n):
            sel = left[pos] > k
            pos, prefix = pos[sel], ids[sel]
            word = word_id[pos + k]
            table = self.keys[k]
            ids = np.full(len(pos), -1, np.int64)
            maybe = np.flatnonzero((prefix < len(self.counts[k - 1])) & (word < v))
            if len(maybe) and len(table):
                key = prefix[maybe] * v + word[maybe]
                order = np.argsort(key)  # sorted queries: searchsorted stays in cache
                maybe, key = maybe[order], key[order]
                at = np.minimum(np.searchsorted(table, key), len(table) - 1)
                found = table[at] == key
                ids[maybe[found]] = at[found]
            new = np.flatnonzero(ids < 0)
            uniq, inverse = _unique_inverse(prefix[new] * m + word[new])
            ids[new] = len(table) + inverse
            levels.append((pos, ids))
            sizes.append(len(self.counts[k]) + len(uniq))
        return self._occurrences(levels, lengths, sizes)

    def _occurrences(self, levels, lengths, sizes) -> _Occurrences:
        """Number all n-grams in one id space: the known ones level by level (so that they
        index `counts` concatenated), then the unknown ones level by level."""
        known = [len(c) for c in self.counts]
        unknown = [size - k for size, k in zip(sizes, known, strict=True)]
        bounds = np.cumsum([0, *known, *unknown])
        owner = np.repeat(np.arange(len(lengths)), lengths)
        ids = [
            np.where(ids < kn, ids + bounds[k], bounds[self.n + k] + ids - kn)
            for k, ((_, ids), kn) in enumerate(zip(levels, known, strict=True))
        ]
        return _Occurrences(
            owner=np.concatenate([owner[pos] for pos, _ in levels]),
            ids=np.concatenate(ids),
            lengths=lengths,
            bounds=bounds[:-1],
        )

    def save(self, path: str | Path) -> None:
        """Write to an .npz file (plain arrays, loadable without pickle)."""
        words = np.frombuffer(" ".join(self.words).encode(), dtype=np.uint8)  # words hold no spaces
        arrays = {f"keys_{k}": a for k, a in enumerate(self.keys)} | {
            f"counts_{k}": c for k, c in enumerate(self.counts)
        }
        np.savez_compressed(path, words=words, num_docs=self.num_docs, n=self.n, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> DocumentFrequency:
        with np.load(path, allow_pickle=False) as data:
            text = data["words"].tobytes().decode()
            n = int(data["n"])
            return cls(
                words=text.split(" ") if text else [],
                keys=[data[f"keys_{k}"] for k in range(n)],
                counts=[data[f"counts_{k}"] for k in range(n)],
                num_docs=int(data["num_docs"]),
            )


def _count_documents(
    captions: list[str], video: np.ndarray, n: int
) -> tuple[DocumentFrequency, _Occurrences]:
    """Index the captions' n-grams and count, per n-gram, the videos holding it (video[i] owns
    captions[i]); also returns the captions' occurrences in that index."""
    index, occ = DocumentFrequency.empty(n).extended(captions)
    size = int(occ.bounds[n])
    pairs = _unique(video[occ.owner] * size + occ.ids)  # distinct (video, n-gram)
    counts = np.bincount(pairs % max(size, 1), minlength=size)
    index.counts = np.split(counts, occ.bounds[1:n])
    index.num_docs = int(video.max()) + 1 if len(video) else 0
    return index, occ


def _flatten_references(references: Mapping[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """All reference captions in order, and the video row owning each."""
    for video_id, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"video {video_id!r}: references must be a non-empty list of strings")
    counts = [len(refs) for refs in references.values()]
    captions = list(chain.from_iterable(references.values()))
    return captions, np.repeat(np.arange(len(counts)), counts)


# --------------------------------------------------------------------------------------------
# The scorer
# --------------------------------------------------------------------------------------------


class CiderD:
    """CIDEr-D (pycocoevalcap's "CIDEr") for tokenised captions.

    references: video id -> reference captions, registered for `score_candidates`; unless `df`
        is given, document frequencies come from them (for SCST: the training references).
    df: document frequencies from another corpus (e.g. `DocumentFrequency.load`).
    A scorer built with neither computes df from each `compute_score` call's own references,
    which is what coco-caption does (parity mode).
    """

    def __init__(
        self,
        references: Mapping[str, Sequence[str]] | None = None,
        n: int = 4,
        sigma: float = 6.0,
        df: DocumentFrequency | None = None,
    ):
        if df is not None and df.n != n:
            raise ValueError(f"df holds 1..{df.n}-grams but n={n}")
        self.n, self.sigma, self.df = n, sigma, df
        self._videos: dict[str, int] = {}
        if references is not None:
            self._register(references)

    def _register(self, references: Mapping[str, Sequence[str]]) -> None:
        """Precompute every reference's tf-idf vector, norm and length, sorted by (video, n-gram)."""
        captions, video = _flatten_references(references)
        if self.df is None:
            self.df, occ = _count_documents(captions, video, self.n)
            self._index = self.df
        else:
            self._index, occ = self.df.extended(captions)
        num_docs = self._index.num_docs
        self._log_n = np.log(float(num_docs)) if num_docs else 0.0
        self._idf = self._log_n - np.log(np.maximum(1.0, np.concatenate(self._index.counts)))  # (G,)
        size = len(self._idf)
        self._videos = {video_id: row for row, video_id in enumerate(references)}
        self._ref_start = np.cumsum([0, *map(len, references.values())])  # (V+1,)
        self._ref_length = _bigram_count(occ.lengths, self.n)  # (R,)

        # One sort of packed (video, n-gram, reference) keys gives the tf of every distinct
        # n-gram of every reference, ordered by (video, n-gram) for the join in scoring.
        most_refs = int(np.diff(self._ref_start).max())
        if len(self._videos) * size * most_refs >= 2**62:
            raise ValueError("reference corpus too large for int64 n-gram keys")
        local = occ.owner - self._ref_start[video[occ.owner]]
        packed, tf = _unique_counts((video[occ.owner] * size + occ.ids) * most_refs + local)
        self._ref_key, self._ref_local = packed // most_refs, packed % most_refs  # video * G + id
        ids = self._ref_key % size
        self._ref_value = tf * self._idf[ids]
        ref = self._ref_start[self._ref_key // size] + self._ref_local
        self._ref_norm = _norms(ref, occ.level_of(ids), self._ref_value, len(captions), self.n)  # (R, n)
        self._entry_start = np.searchsorted(self._ref_key, np.arange(len(self._videos) + 1) * size)

    def score_candidates(self, video_ids: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D of each candidate against all registered references of its video: (C,)."""
        if not self._videos:
            raise ValueError("no references registered: build CiderD(references=...) first")
        if len(video_ids) != len(candidates):
            raise ValueError(f"{len(video_ids)} video ids but {len(candidates)} candidates")
        missing = [v for v in dict.fromkeys(video_ids) if v not in self._videos]
        if missing:
            raise KeyError(f"no references for video ids {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        rows = np.fromiter(map(self._videos.__getitem__, video_ids), dtype=np.int64, count=len(video_ids))
        occ = self._index.lookup(candidates)
        size = len(self._idf)

        # Candidate tf-idf vectors, as (candidate, n-gram) entries sorted by candidate.
        span = int(occ.ids.max(initial=0)) + 1
        packed, tf = _unique_counts(occ.owner * span + occ.ids)
        cand, ids = packed // span, packed % span
        level = occ.level_of(ids)
        value = tf * np.where(ids < size, self._idf[np.minimum(ids, size - 1)], self._log_n)
        cand_norm = _norms(cand, level, value, len(candidates), self.n)  # (C, n)
        cand_length = _bigram_count(occ.lengths, self.n)  # (C,)

        # One row per (candidate, reference of its video) pair.
        num_refs = np.diff(self._ref_start)[rows]  # (C,)
        pair_start = np.cumsum(num_refs) - num_refs
        pair_cand = np.repeat(np.arange(len(rows)), num_refs)  # (P,)
        pair_ref = self._ref_start[rows][pair_cand] + np.arange(len(pair_cand)) - pair_start[pair_cand]

        # Join candidate n-grams with the same n-gram in the references of the same video,
        # searching only the reference entries of this batch's videos.
        batch = _unique(rows)
        block = _ranges(self._entry_start[batch], self._entry_start[batch + 1])
        block_key = self._ref_key[block]
        known = np.flatnonzero(ids < size)
        query = rows[cand[known]] * size + ids[known]
        order = np.argsort(query)
        known, query = known[order], query[order]
        lo = np.searchsorted(block_key, query, side="left")
        hits = np.searchsorted(block_key, query, side="right") - lo
        src = np.repeat(known, hits)  # candidate entry of each match
        match = block[np.repeat(lo - (np.cumsum(hits) - hits), hits) + np.arange(hits.sum())]
        ref_value = self._ref_value[match]
        clipped = np.minimum(value[src], ref_value) * ref_value
        pair = pair_start[cand[src]] + self._ref_local[match]
        dot = np.bincount(pair * self.n + level[src], weights=clipped, minlength=len(pair_cand) * self.n)

        denom = (cand_norm[pair_cand] * self._ref_norm[pair_ref]).ravel()
        sim = np.divide(dot, denom, out=np.zeros(len(dot)), where=denom != 0).reshape(-1, self.n)
        delta = (cand_length[pair_cand] - self._ref_length[pair_ref]).astype(np.float64)
        sim *= (np.e ** (-(delta**2) / (2 * self.sigma**2)))[:, None]
        per_pair = sim.mean(axis=1)
        return np.bincount(pair_cand, weights=per_pair, minlength=len(rows)) / num_refs * 10.0

    def compute_score(
        self, gts: Mapping[str, Sequence[str]], res: Mapping[str, str | Sequence[str]]
    ) -> tuple[float, np.ndarray]:
        """Corpus CIDEr-D and per-video scores (in gts order), like pycocoevalcap's Cider.

        res values are caption strings (or pycocoevalcap's one-element lists). df comes from
        this scorer's corpus, or, for a scorer built without one, from gts itself.
        """
        if set(gts) != set(res):
            raise ValueError(f"gts and res cover different videos: {sorted(set(gts) ^ set(res))[:5]}")
        if not gts:
            raise ValueError("nothing to score: gts is empty")
        candidates = [_one_caption(video_id, res[video_id]) for video_id in gts]
        scores = CiderD(gts, self.n, self.sigma, df=self.df).score_candidates(list(gts), candidates)
        return float(scores.mean()), scores

    def save(self, path: str | Path) -> None:
        """Cache the document frequencies (npz) for `CiderD.load`."""
        if self.df is None:
            raise ValueError("this scorer has no corpus document frequencies to save")
        self.df.save(path)

    @classmethod
    def load(
        cls, path: str | Path, references: Mapping[str, Sequence[str]] | None = None, sigma: float = 6.0
    ) -> CiderD:
        """A scorer with the cached document frequencies, scoring against `references`."""
        df = DocumentFrequency.load(path)
        return cls(references, n=df.n, sigma=sigma, df=df)


def _one_caption(video_id: str, caption: str | Sequence[str]) -> str:
    if isinstance(caption, str):
        return caption
    if len(caption) != 1:
        raise ValueError(f"video {video_id!r}: expected one candidate caption, got {len(caption)}")
    return caption[0]


def _norms(owner: np.ndarray, level: np.ndarray, value: np.ndarray, count: int, n: int) -> np.ndarray:
    """Per caption and level, the l2 norm of its tf-idf vector: (count, n)."""
    return np.sqrt(np.bincount(owner * n + level, weights=value**2, minlength=count * n)).reshape(count, n)


def _bigram_count(lengths: np.ndarray, n: int) -> np.ndarray:
    """pycocoevalcap's caption "length": the sum of its bigram counts."""
    return np.maximum(lengths - 1, 0) if n >= 2 else np.zeros_like(lengths)


def cider_d_reward(
    scorer: CiderD,
    video_ids: Sequence[str],
    samples: Sequence[Sequence[str]],
    baselines: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SCST rewards for k sampled captions per video, and their advantages over a baseline.

    samples: (B, k) tokenised captions; baselines: one greedy caption per video, or None for
    the mean reward of the other k-1 samples. Returns (reward, advantage), both (B, k).
    """
    k = len(samples[0]) if len(samples) else 0
    if any(len(row) != k for row in samples) or (baselines is None and k < 2):
        raise ValueError("samples must be (B, k) with k >= 2 when no baseline captions are given")
    flat = [caption for row in samples for caption in row] + list(baselines or [])
    ids = [v for v in video_ids for _ in range(k)] + (list(video_ids) if baselines is not None else [])
    scores = scorer.score_candidates(ids, flat)
    reward = scores[: len(video_ids) * k].reshape(len(video_ids), k)
    if baselines is None:
        baseline = (reward.sum(axis=1, keepdims=True) - reward) / (k - 1)
    else:
        baseline = scores[len(video_ids) * k :, None]
    return reward, reward - baseline


# --------------------------------------------------------------------------------------------
# A java-free stand-in for the PTB tokenizer (SCST rewards)
# --------------------------------------------------------------------------------------------

PTB_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
"""Tokens pycocoevalcap drops after PTB tokenisation. Its list also names -LRB- -RRB- -LCB-
-RCB-, but it tokenises with -lowerCase, so those arrive as -lrb- etc. and are kept."""

_DROPPED = PTB_DROPPED | {'"', "“", "”", "…", "—", "–"}  # PTB turns these into dropped tokens
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPECIAL = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "can't": "ca n't",
    "won't": "wo n't",
}
_SPLIT_OFF = re.compile(r"""(\.\.\.|…|--|—|–|[,;:?!"“”()\[\]{}&$%#])""")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m|')$")
_ACRONYM = re.compile(r"^([a-z]\.)+$|^\d+(\.\d+)*$")


def simple_tokenize(text: str) -> str:
    """Tokenise one caption as coco-caption's PTB tokenizer + punctuation filter would, in Python.

    Lowercases, splits off punctuation and clitics ("man's" -> "man 's", "don't" -> "do n't"),
    spells brackets as PTB does ("(" -> "-lrb-"), keeps hyphenated words and numbers ("t-shirt",
    "3.5"), and drops the tokens pycocoevalcap drops (. , ; : ? ! quotes dashes ...).
    Equal to PTB on plain captions; known differences: abbreviations ("mr. smith": PTB keeps
    "mr."), punctuation runs ("!?" is one kept token in PTB), rarer contractions ("'tis",
    "gimme") and unusual Unicode punctuation.

    >>> simple_tokenize("A man's dog, running (fast).")
    "a man 's dog running -lrb- fast -rrb-"
    """
    text = _SPLIT_OFF.sub(r" \1 ", text.lower().replace("’", "'").replace("‘", "'"))
    tokens = []
    for word in text.split():
        for token in _SPECIAL.get(word, word).split():
            tokens.extend(_split_word(token))
    return " ".join(_BRACKETS.get(t, t) for t in tokens if t and t not in _DROPPED)


def _split_word(word: str) -> list[str]:
    word = word.lstrip("'`") if word not in ("'s", "'em") else word
    if word.endswith(".") and not _ACRONYM.match(word):
        word = word.rstrip(".")
    match = _CLITIC.match(word)
    return [match[1], match[2]] if match else [word]
