from __future__ import annotations

import json

import pytest
import torch

from captioner.config import DataConfig
from captioner.data.training_data import CaptionPairs, make_collate, read_splits
from captioner.errors import ConfigError
from captioner.vocab import Vocab
from tests.test_readers import coco_captions, item, write_json


def _coco_file(folder, name: str, prefix: str) -> str:
    """A COCO captions file beside its images (the default root), file names with ``prefix``."""
    data = json.loads(json.dumps(coco_captions(folder)).replace("COCO_val2014_", prefix))
    for image in data["images"]:
        (folder / image["file_name"]).touch()
    return str(write_json(folder / name, data))


def test_a_coco_training_file_without_a_val_file_is_refused(tmp_path) -> None:
    # A COCO captions file has no splits: reading its "val" split would label the training
    # images as validation images, and the model would be validated on what it trained on.
    train = _coco_file(tmp_path / "train2014", "captions_train2014.json", "COCO_train2014_")
    with pytest.raises(ConfigError, match=r"no splits.*set data\.val"):
        read_splits(DataConfig(train=train))


def test_a_coco_training_file_validates_on_its_val_file(tmp_path) -> None:
    train = _coco_file(tmp_path / "train2014", "captions_train2014.json", "COCO_train2014_")
    val = _coco_file(tmp_path / "val2014", "captions_val2014.json", "COCO_val2014_")
    train_items, val_items = read_splits(DataConfig(train=train, val=val))
    assert {i.split for i in train_items} == {"train"} and {i.split for i in val_items} == {"val"}
    assert not {i.paths for i in train_items} & {i.paths for i in val_items}
    assert len(train_items) == len(val_items) == 2  # the images with captions


def test_a_manifest_carries_its_splits(tmp_path) -> None:
    lines = [
        {"path": f"{name}.png", "captions": [f"a {name} circle"], "split": split}
        for name, split in (("red", "train"), ("blue", "val"), ("green", "test"))
    ]
    for line in lines:
        (tmp_path / line["path"]).touch()
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    train_items, val_items = read_splits(DataConfig(train=str(manifest)))
    assert [i.id for i in train_items] == ["red"] and [i.id for i in val_items] == ["blue"]


def test_pairs_repeat_videos_and_collate_pads_for_teacher_forcing() -> None:
    vocab = Vocab.build(["a red circle", "a blue square moves"])
    items = [
        item("img", [], ["a red circle"], "train"),
        item("clip", [], ["a blue square moves"], "train", kind="video"),
    ]
    pairs = CaptionPairs(items, vocab, max_length=3, video_repeats=2)
    assert [index for index, _ in pairs.pairs] == [0, 1, 1]
    assert all(len(tokens) <= 3 for _, tokens in pairs.pairs)
    batch = make_collate(vocab)(
        [(torch.zeros(1, 5), [4, 5], 0), (None, [6], 1), (torch.zeros(3, 5), [6, 7, 8], 2)]
    )
    assert batch.visual.shape == (2, 3, 5) and batch.lengths.tolist() == [1, 3]
    assert batch.items.tolist() == [0, 2]  # each pair's item, for the caption memory
    bos, eos, pad = vocab.bos_id, vocab.eos_id, vocab.pad_id
    assert batch.inputs.tolist() == [[bos, 4, 5, pad], [bos, 6, 7, 8]]
    assert batch.targets.tolist() == [[4, 5, eos, pad], [6, 7, 8, eos]]
