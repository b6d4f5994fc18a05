from __future__ import annotations

import json

import pytest

from captioner.data.items import CaptionItem
from captioner.evaluation import coco_metrics, java_available, scene_accuracy, write_predictions

REFS = {
    "1": ["a red circle on a gray background", "there is a red circle"],
    "2": ["a blue square moves to the left", "a blue square is moving left"],
}


def test_perfect_predictions_score_the_maximum_without_java() -> None:
    scores = coco_metrics(
        REFS,
        {"1": "a red circle on a gray background", "2": "a blue square moves to the left"},
        use_java=False,
    )
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert "METEOR" not in scores and "METEOR skipped" in scores["notes"][0]
    worse = coco_metrics(REFS, {"1": "a blue square", "2": "a red circle"}, use_java=False)
    assert worse["CIDEr-D"] < scores["CIDEr-D"] and worse["BLEU-1"] < 1.0


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="METEOR and the PTB tokenizer need Java")
def test_meteor_and_ptb_tokenizer_with_java() -> None:
    scores = coco_metrics(
        REFS, {"1": "A red circle, on a gray background.", "2": "a blue square moves right"}
    )
    assert 0 < scores["METEOR"] <= 1 and "notes" not in scores
    assert set(scores) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}


def _item(item_id: str, scene: str, objects, motion=None) -> CaptionItem:
    meta = {"scene": scene, "objects": [{"colour": c, "shape": s} for c, s in objects]}
    if motion:
        meta["motion"] = {"object": 0, "kind": motion}
    return CaptionItem(item_id, (), "image", ("x",), "test", meta)


def test_scene_accuracy_by_scene_type_and_motion() -> None:
    items = [
        _item("a", "one_object", [("red", "circle")]),
        _item("b", "one_object", [("blue", "star")]),
        _item("c", "two_objects", [("red", "circle"), ("green", "square")]),
        _item("d", "motion", [("white", "hexagon")], motion="left"),
    ]
    predictions = {
        "a": "a red circle",
        "b": "a red star",  # wrong colour
        "c": "a green square to the right of a red circle",
        "d": "a white hexagon moves to the right",  # right object, wrong direction
    }
    result = scene_accuracy(items, predictions)
    assert result["attribute_accuracy"] == {
        "overall": 0.75, "one_object": 0.5, "two_objects": 1.0, "clips": 1.0,
    }  # fmt: skip
    assert result["motion_accuracy"] == 0.0
    assert result["scored_items"] == {"clips": 1, "one_object": 2, "two_objects": 1}


def test_predictions_are_written_in_coco_result_format(tmp_path) -> None:
    write_predictions(tmp_path / "p.json", {"391895": "a man", "vid-1": "a car"})
    assert json.loads((tmp_path / "p.json").read_text()) == [
        {"image_id": 391895, "caption": "a man"},
        {"image_id": "vid-1", "caption": "a car"},
    ]
