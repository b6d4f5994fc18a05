"""Tests for captioner.retrieval: nearest neighbours, sentence CIDEr-D and consensus choice."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.evaluation import coco_metrics
from captioner.retrieval import ConsensusScorer, RetrievalPool, nearest, normalise_rows


def test_nearest_orders_by_cosine_and_breaks_ties_by_index() -> None:
    pool = normalise_rows(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))
    index, similarity = nearest(normalise_rows(np.array([[1.0, 0.1]])), pool, k=3)
    assert index.tolist() == [[0, 3, 2]]  # rows 0 and 3 point the same way: lower index first
    assert similarity[0, 0] == pytest.approx(similarity[0, 1])
    assert similarity[0].tolist() == sorted(similarity[0].tolist(), reverse=True)


def test_nearest_with_k_larger_than_the_pool() -> None:
    index, _ = nearest(normalise_rows(np.eye(2)), normalise_rows(np.eye(2)), k=5)
    assert index.tolist() == [[0, 1], [1, 0]]


def test_sentence_cider_matches_pycocoevalcap_on_one_reference() -> None:
    pool = [["a cat on a mat"], ["a dog on a log"], ["a red flag"], ["flag of egypt"]]
    scorer = ConsensusScorer(pool)
    # pycocoevalcap takes its document frequencies from the references of the scored set:
    # score one candidate against each pool caption so that both use the same frequencies.
    references = {str(i): captions for i, captions in enumerate(pool)}
    candidate = "a cat on a log"
    predictions = {str(i): candidate for i in range(len(pool))}
    expected = coco_metrics(references, predictions, metrics=("CIDEr-D",), use_java=False)
    mine = np.mean([scorer.similarity(candidate, captions[0]) for captions in pool])
    assert mine == pytest.approx(expected["CIDEr-D"], abs=1e-3)


def test_identical_captions_score_highest() -> None:
    scorer = ConsensusScorer([["a cat"], ["a dog"], ["thumbs up sign"]])
    assert scorer.similarity("thumbs up sign", "thumbs up sign") > scorer.similarity(
        "thumbs up", "thumbs up sign"
    )
    assert scorer.similarity("a cat", "thumbs up sign") == 0.0


def test_nearest_neighbour_and_consensus_choices() -> None:
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    captions = [
        ["a rare odd caption"],
        ["a grinning face"],
        ["a grinning face with big eyes"],
        ["flag of egypt"],
    ]
    pool = RetrievalPool(features, captions)
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert pool.nearest_neighbour(query) == ["a rare odd caption", "flag of egypt"]
    # Among the three nearest, the two grinning faces agree with each other; the odd one out
    # agrees with nobody, although it is the nearest.
    assert pool.consensus(query[:1], k=3)[0].startswith("a grinning face")
    assert pool.consensus(query[1:], k=1) == ["flag of egypt"]


def test_pool_needs_one_caption_list_per_row() -> None:
    with pytest.raises(ValueError, match="one caption list per feature row"):
        RetrievalPool(np.zeros((2, 3)), [["a"]])
