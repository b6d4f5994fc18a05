"""Caption retrieval: nearest-neighbour and consensus re-ranking over a pool of captioned items.

These are the baselines a trained captioner must beat (Devlin et al. 2015, *Exploring Nearest
Neighbor Approaches for Image Captioning*), computed on the same items and scored the same way:

- **nearest neighbour**: the caption of the most similar pool item, by cosine similarity of
  pooled encoder features;
- **consensus re-ranking**: among the captions of the k most similar pool items, the one with
  the highest mean CIDEr-D against the others, each weighted by its item's similarity.

Everything here is numpy over (N, D) feature matrices, so it costs milliseconds per thousand
queries; it knows nothing of models or media. ``ConsensusScorer`` is the sentence-level CIDEr-D
used for the consensus, kept apart so that decoding can reuse it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from captioner.vocab import tokenize

NGRAMS = 4
CONSENSUS_K = 10  # neighbours whose captions vote; Devlin et al. found tens work on COCO
SIGMA = 6.0  # CIDEr-D's Gaussian length penalty, as in pycocoevalcap


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def nearest(queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (Q, k) and cosine similarities (Q, k) of each query's k most similar pool rows.

    Both inputs must be row-normalised (:func:`normalise_rows`). Ties go to the lower index.
    """
    k = min(k, len(pool))
    similarity = queries @ pool.T  # (Q, P)
    # argsort on the negated scores is stable, so equal scores keep pool order.
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


class ConsensusScorer:
    """Sentence-level CIDEr-D between captions, with document frequencies from a caption pool.

    Each caption is a TF-IDF vector of its 1..4-grams; the similarity of two captions is the
    mean over n of the clipped cosine, times CIDEr-D's length penalty, times 10 (pycocoevalcap's
    scale). The pool is usually the training captions, so rare words weigh most.
    """

    def __init__(self, pool_captions: Sequence[Sequence[str]]) -> None:
        frequency: Counter[tuple[str, ...]] = Counter()
        for captions in pool_captions:  # document frequency: per item, not per caption
            frequency.update({g for c in captions for g in _ngrams(tokenize(c))})
        self.frequency = frequency
        self.log_items = math.log(max(1, len(pool_captions)))
        self._cache: dict[str, tuple[list[dict[tuple[str, ...], float]], list[float], int]] = {}

    def vector(self, caption: str) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        """Per n: the n-gram TF-IDF weights, their norms, and the caption's length in tokens."""
        cached = self._cache.get(caption)
        if cached is not None:
            return cached
        tokens = tokenize(caption)
        weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(NGRAMS)]
        for gram, count in Counter(_ngrams(tokens)).items():
            idf = self.log_items - math.log(max(1.0, self.frequency.get(gram, 0)))
            weights[len(gram) - 1][gram] = count * idf
        norms = [math.sqrt(sum(w * w for w in per_n.values())) for per_n in weights]
        result = (weights, norms, len(tokens))
        self._cache[caption] = result
        return result

    def similarity(self, candidate: str, reference: str) -> float:
        """CIDEr-D of ``candidate`` against the single reference ``reference``."""
        cand_w, cand_n, cand_len = self.vector(candidate)
        ref_w, ref_n, ref_len = self.vector(reference)
        total = 0.0
        for n in range(NGRAMS):
            if not cand_n[n] or not ref_n[n]:
                continue
            # CIDEr-D clips the candidate's counts at the reference's, so repeats earn nothing.
            dot = sum(
                min(w, ref_w[n][g]) * ref_w[n][g] for g, w in cand_w[n].items() if g in ref_w[n]
            )
            total += dot / (cand_n[n] * ref_n[n])
        penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * SIGMA**2))
        return 10.0 * penalty * total / NGRAMS

    def consensus(
        self, candidate: str, references: Sequence[str], weights: Sequence[float]
    ) -> float:
        """Weighted mean similarity of ``candidate`` to ``references``."""
        total = sum(weights)
        if not references or total <= 0:
            return 0.0
        score = sum(
            w * self.similarity(candidate, r) for r, w in zip(references, weights, strict=True)
        )
        return score / total


def _ngrams(tokens: Sequence[str]) -> list[tuple[str, ...]]:
    return [
        tuple(tokens[i : i + n]) for n in range(1, NGRAMS + 1) for i in range(len(tokens) - n + 1)
    ]


@dataclass
class RetrievalPool:
    """Captioned items to retrieve from: normalised features (P, D) and each item's captions."""

    features: np.ndarray
    captions: list[list[str]]

    def __post_init__(self) -> None:
        if len(self.features) != len(self.captions) or not len(self.captions):
            raise ValueError("a retrieval pool needs one caption list per feature row, and rows")
        self.features = normalise_rows(self.features)
        self.scorer = ConsensusScorer(self.captions)

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and similarities of each query's k most similar pool items."""
        return nearest(normalise_rows(queries), self.features, k)

    def nearest_neighbour(self, queries: np.ndarray) -> list[str]:
        """Each query gets the first caption of its most similar pool item."""
        index, _ = self.neighbours(queries, 1)
        return [self.captions[int(row[0])][0] for row in index]

    def candidates(
        self, index: np.ndarray, similarity: np.ndarray
    ) -> tuple[list[str], list[float]]:
        """The captions of some pool items, each with its item's similarity as its weight."""
        captions, weights = [], []
        for i, s in zip(index, similarity, strict=True):
            for caption in self.captions[int(i)]:
                captions.append(caption)
                weights.append(max(float(s), 0.0))
        return captions, weights

    def consensus(self, queries: np.ndarray, k: int) -> list[str]:
        """Each query gets the caption of its k neighbours that agrees most with the others.

        A caption is scored against the other neighbours' captions (not its own item's), so
        an item with five captions does not vote for itself; with a single neighbour, that
        neighbour's first caption wins.
        """
        index, similarity = self.neighbours(queries, k)
        chosen = []
        for rows, sims in zip(index, similarity, strict=True):
            best, best_score = self.captions[int(rows[0])][0], -1.0
            for position, row in enumerate(rows):
                others = np.delete(np.arange(len(rows)), position)
                references, weights = self.candidates(rows[others], sims[others])
                for caption in self.captions[int(row)]:
                    score = self.scorer.consensus(caption, references, weights)
                    if score > best_score:
                        best, best_score = caption, score
            chosen.append(best)
        return chosen
