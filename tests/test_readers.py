"""Tests for captioner.data.readers, on tiny files in each dataset's real format."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from captioner.data.items import CaptionItem
from captioner.data.readers import (
    ReadResult,
    check_skipped,
    load_dataset,
    read_coco,
    read_karpathy,
    read_manifest,
    read_msrvtt,
)
from captioner.errors import ConfigError, DatasetError


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not really media")


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write one line per entry: a dict as JSON, a str as it is (to fabricate broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def item(
    item_id: str, paths: list[Path], captions: list[str], split: str, kind: str = "image"
) -> CaptionItem:
    return CaptionItem(
        id=item_id, paths=tuple(paths), kind=kind, captions=tuple(captions), split=split
    )


def assert_fails(match: str, call: Any, *args: Any, **kwargs: Any) -> str:
    """Assert that a reader raises DatasetError whose message contains ``match`` literally."""
    with pytest.raises(DatasetError, match=re.escape(match)) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# --- JSONL manifest ---------------------------------------------------------------------------


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    touch(
        media / "cat.jpg",
        media / "clip.MP4",
        media / "frames" / "0001.png",
        media / "frames" / "0002.png",
        tmp_path / "elsewhere" / "dog.jpg",
    )
    return write_jsonl(
        tmp_path / "media" / "manifest.jsonl",
        [
            {"path": "cat.jpg", "captions": [" a cat sits. ", "a cat"], "split": "train"},
            "",
            {
                "id": "clip-1",
                "path": "clip.MP4",
                "captions": ["a clip"],
                "split": "val",
                "meta": {"source": "test"},
            },
            "   ",
            {"paths": ["frames/0001.png", "frames/0002.png"], "captions": [], "split": "test"},
            {
                "path": str(tmp_path / "elsewhere" / "dog.jpg"),
                "captions": ["a dog"],
                "split": "train",
                "kind": "image",
                "unknown_field": 1,
            },
        ],
    )


def test_manifest_happy_path(manifest: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    result = read_manifest(manifest)
    assert result == ReadResult(
        items=[
            item("cat", [media / "cat.jpg"], ["a cat sits.", "a cat"], "train"),
            item("clip-1", [media / "clip.MP4"], ["a clip"], "val", kind="video"),
            item(
                "frames",
                [media / "frames" / "0001.png", media / "frames" / "0002.png"],
                [],
                "test",
                kind="video",
            ),
            # Outside the root folder, the id is the path as written, without the extension.
            item(
                (tmp_path / "elsewhere" / "dog").as_posix(),
                [tmp_path / "elsewhere" / "dog.jpg"],
                ["a dog"],
                "train",
            ),
        ],
        skipped=[],
        source=manifest,
    )
    assert [i.meta for i in result.items] == [{}, {"source": "test"}, {}, {}]
    assert result.items[2].is_frame_sequence
    assert all(path.is_absolute() for i in result.items for path in i.paths)


def test_manifest_relative_paths_follow_the_manifest_folder(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = read_manifest(Path("media/manifest.jsonl"))
    assert result.items[0].paths == (tmp_path / "media" / "cat.jpg",)


def test_manifest_root_overrides_the_manifest_folder(tmp_path: Path) -> None:
    touch(tmp_path / "images" / "a.jpg")
    path = write_jsonl(
        tmp_path / "lists" / "m.jsonl", [{"path": "a.jpg", "captions": ["x"], "split": "val"}]
    )
    result = read_manifest(path, root=tmp_path / "images")
    assert result.items == [item("a", [tmp_path / "images" / "a.jpg"], ["x"], "val")]


def test_manifest_gif_and_video_extensions_default_to_video(tmp_path: Path) -> None:
    names = ["a.gif", "b.webm", "c.avi", "d.mov", "e.mkv", "f.jpeg"]
    touch(*(tmp_path / name for name in names))
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"path": n, "captions": [], "split": "test"} for n in names]
    )
    kinds = [i.kind for i in read_manifest(path).items]
    assert kinds == ["video"] * 5 + ["image"]


def test_manifest_without_file_checks_accepts_missing_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"path": "gone.jpg", "captions": [], "split": "val"}])
    assert read_manifest(path, check_files=False).items == [
        item("gone", [tmp_path / "gone.jpg"], [], "val")
    ]


MANIFEST_GOOD = {"path": "ok.jpg", "captions": ["fine"], "split": "train"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"path": "x.jpg", "captions": [', "not valid JSON"),
        ("[1, 2]", "the line must be an object, got an array"),
        ({"captions": ["c"], "split": "train"}, "give exactly one of 'path'"),
        ({"path": "a.jpg", "paths": ["a.jpg"], "captions": [], "split": "val"}, "exactly one"),
        ({"path": "ok.jpg", "split": "train"}, "missing field 'captions'"),
        ({"path": "ok.jpg", "captions": ["c"]}, "missing field 'split'"),
        ({"path": "ok.jpg", "captions": "c", "split": "val"}, "'captions' must be an array"),
        ({"path": "ok.jpg", "captions": ["c", 3], "split": "val"}, "'captions'[1] must be a"),
        ({"path": "ok.jpg", "captions": ["  "], "split": "val"}, "'captions'[0] is an empty"),
        ({"path": 7, "captions": [], "split": "val"}, "'path' must be a non-empty string"),
        ({"path": "ok.jpg", "captions": [], "split": "dev"}, "'split' must be one of"),
        ({"path": "ok.jpg", "captions": [], "split": "val", "kind": "audio"}, "'kind'"),
        ({"path": "ok.jpg", "captions": [], "split": "val", "id": 5}, "'id' must be"),
        ({"path": "ok.jpg", "captions": [], "split": "val", "meta": []}, "'meta' must be"),
        ({"paths": [], "captions": [], "split": "val"}, "'paths' is empty"),
        (
            {"paths": ["ok.jpg", "ok.jpg"], "captions": [], "split": "val", "kind": "image"},
            "must have kind 'video'",
        ),
        ({"path": "missing.jpg", "captions": [], "split": "val"}, "file not found: "),
        ({"id": "ok", "path": "ok.jpg", "captions": [], "split": "val"}, "duplicate id 'ok'"),
    ],
)
def test_manifest_malformed_line(tmp_path: Path, line: Any, problem: str) -> None:
    touch(tmp_path / "ok.jpg")
    path = write_jsonl(tmp_path / "m.jsonl", [MANIFEST_GOOD, "", line])

    message = assert_fails(problem, read_manifest, path)
    assert message.startswith(f"{path}: line 3: ")
    assert "on_error='skip'" in message

    result = read_manifest(path, on_error="skip")
    assert [i.id for i in result.items] == ["ok"]
    assert len(result.skipped) == 1
    assert result.skipped[0].startswith(f"{path}: line 3: ")


def test_manifest_missing_file_message_names_the_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"path": "a.jpg", "captions": [], "split": "val"}])
    message = assert_fails(
        f"{path}: line 1: file not found: {tmp_path / 'a.jpg'}", read_manifest, path
    )
    assert "check_files=False" in message


def test_manifest_skip_mode_keeps_the_rest_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    touch(tmp_path / "a.jpg", tmp_path / "b.jpg")
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"path": "a.jpg", "captions": ["one"], "split": "train"},
            "{broken",
            {"path": "b.jpg", "captions": [1], "split": "train"},
            {"path": "c.jpg", "captions": [], "split": "train"},
            {"path": "b.jpg", "captions": ["two"], "split": "val"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="captioner.data.readers"):
        result = read_manifest(path, on_error="skip")
    assert result.items == [
        item("a", [tmp_path / "a.jpg"], ["one"], "train"),
        item("b", [tmp_path / "b.jpg"], ["two"], "val"),
    ]
    assert [m.split(": ")[1] for m in result.skipped] == ["line 2", "line 3", "line 4"]
    assert len(caplog.records) == 1
    assert "skipped 3" in caplog.records[0].getMessage()


def test_manifest_bad_utf8_line_is_malformed(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    path = tmp_path / "m.jsonl"
    good = json.dumps({"path": "a.jpg", "captions": [], "split": "val"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\xff\xfe\n")
    assert_fails(f"{path}: line 2: not valid UTF-8", read_manifest, path)
    result = read_manifest(path, on_error="skip")
    assert [i.id for i in result.items] == ["a"]
    assert len(result.skipped) == 1


def test_manifest_missing_file_always_raises(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert_fails(str(path), read_manifest, path, on_error="skip")


def test_unknown_on_error_is_a_config_error(manifest: Path) -> None:
    with pytest.raises(ConfigError, match="on_error"):
        read_manifest(manifest, on_error="ignore")  # type: ignore[arg-type]


# --- Karpathy splits ----------------------------------------------------------------------------


def karpathy_coco(root: Path) -> dict[str, Any]:
    touch(
        root / "val2014" / "COCO_val2014_000000391895.jpg",
        root / "train2014" / "COCO_train2014_000000000009.jpg",
        root / "val2014" / "COCO_val2014_000000000042.jpg",
        root / "val2014" / "COCO_val2014_000000000007.jpg",
    )

    def sentence(raw: str, imgid: int, sentid: int) -> dict[str, Any]:
        tokens = raw.lower().strip(" .").split()
        return {"raw": raw, "tokens": tokens, "imgid": imgid, "sentid": sentid}

    return {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000391895.jpg",
                "imgid": 0,
                "split": "test",
                "sentences": [
                    sentence("A man with a red helmet on a small moped. ", 0, 0),
                    sentence("Man riding a motor bike on a dirt road.", 0, 1),
                ],
                "cocoid": 391895,
                "sentids": [0, 1],
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_000000000009.jpg",
                "imgid": 1,
                "split": "train",
                "sentences": [sentence("Closeup of bins of food.", 1, 2)],
                "cocoid": 9,
                "sentids": [2],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000042.jpg",
                "imgid": 2,
                "split": "restval",
                "sentences": [sentence("A dog.", 2, 3)],
                "cocoid": 42,
                "sentids": [3],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000007.jpg",
                "imgid": 3,
                "split": "val",
                "sentences": [sentence("Two cats.", 3, 4)],
                "cocoid": 7,
                "sentids": [4],
            },
        ],
    }


def test_karpathy_coco_happy_path(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    path = write_json(tmp_path / "dataset_coco.json", karpathy_coco(root))
    result = read_karpathy(path, root)
    assert result.items == [
        item(
            "391895",
            [root / "val2014" / "COCO_val2014_000000391895.jpg"],
            [
                "A man with a red helmet on a small moped.",
                "Man riding a motor bike on a dirt road.",
            ],
            "test",
        ),
        item(
            "9",
            [root / "train2014" / "COCO_train2014_000000000009.jpg"],
            ["Closeup of bins of food."],
            "train",
        ),
        item("42", [root / "val2014" / "COCO_val2014_000000000042.jpg"], ["A dog."], "train"),
        item("7", [root / "val2014" / "COCO_val2014_000000000007.jpg"], ["Two cats."], "val"),
    ]
    assert [i.meta for i in result.items] == [
        {"karpathy_split": "test"},
        {"karpathy_split": "train"},
        {"karpathy_split": "restval"},
        {"karpathy_split": "val"},
    ]
    assert result.skipped == []
    assert result.source == path


def test_karpathy_flickr_uses_imgid_and_no_filepath(tmp_path: Path) -> None:
    root = tmp_path / "Flickr8k_Dataset"
    touch(root / "1000268201_693b08cb0e.jpg", root / "1001773457_577c3a7d70.jpg")
    data = {
        "dataset": "flickr8k",
        "images": [
            {
                "filename": "1000268201_693b08cb0e.jpg",
                "imgid": 0,
                "split": "train",
                "sentences": [{"raw": "A child in a pink dress .", "tokens": [], "imgid": 0}],
                "sentids": [0],
            },
            {
                "filename": "1001773457_577c3a7d70.jpg",
                "split": "val",
                "sentences": [{"raw": "A black dog .", "tokens": [], "imgid": 1}],
            },
        ],
    }
    path = write_json(tmp_path / "dataset_flickr8k.json", data)
    assert read_karpathy(path, root).items == [
        item("0", [root / "1000268201_693b08cb0e.jpg"], ["A child in a pink dress ."], "train"),
        item(
            "1001773457_577c3a7d70", [root / "1001773457_577c3a7d70.jpg"], ["A black dog ."], "val"
        ),
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e.pop("filename"), "missing field 'filename'"),
        (lambda e: e.update(split="dev"), "'split' must be one of train, restval, val, test"),
        (lambda e: e.update(sentences={"raw": "x"}), "'sentences' must be an array"),
        (lambda e: e["sentences"][0].pop("raw"), "'sentences'[0] has no 'raw' text"),
        (lambda e: e["sentences"][1].update(raw=None), "'sentences'[1]['raw'] must be a caption"),
        (lambda e: e.update(cocoid="9"), "'cocoid' must be an integer, got a string"),
        (lambda e: e.update(filename="gone.jpg"), "file not found: "),
    ],
)
def test_karpathy_malformed_entry(tmp_path: Path, change: Any, problem: str) -> None:
    root = tmp_path / "coco"
    data = karpathy_coco(root)
    change(data["images"][0])
    path = write_json(tmp_path / "dataset_coco.json", data)

    message = assert_fails(problem, read_karpathy, path, root)
    assert message.startswith(f"{path}: images[0]")
    assert "on_error='skip'" in message

    result = read_karpathy(path, root, on_error="skip")
    assert [i.id for i in result.items] == ["9", "42", "7"]
    assert len(result.skipped) == 1


def test_karpathy_duplicate_id(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    data = karpathy_coco(root)
    data["images"][2]["cocoid"] = 9
    path = write_json(tmp_path / "dataset_coco.json", data)
    assert_fails(f"{path}: images[2] (id 9): duplicate id '9'", read_karpathy, path, root)
    result = read_karpathy(path, root, on_error="skip")
    assert [i.id for i in result.items] == ["391895", "9", "7"]


def test_karpathy_message_names_the_item_id(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    data = karpathy_coco(root)
    data["images"][1]["split"] = "dev"
    path = write_json(tmp_path / "dataset_coco.json", data)
    assert_fails(f"{path}: images[1] (id 9): 'split'", read_karpathy, path, root)


@pytest.mark.parametrize("content", ['{"images": [', "[1, 2]", '{"dataset": "coco"}'])
def test_karpathy_bad_top_level_always_raises(tmp_path: Path, content: str) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text(content, encoding="utf-8")
    assert_fails(str(path), read_karpathy, path, tmp_path, on_error="skip")


def test_json_readers_report_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    assert_fails(f"{path}: cannot read", read_karpathy, path, tmp_path)
    assert_fails(f"{path}: cannot read", read_coco, path, tmp_path, split="val")
    assert_fails(f"{path}: cannot read", read_msrvtt, path, tmp_path)
    assert_fails(f"{path}: cannot read", load_dataset, path)


def test_missing_media_root_is_reported_once(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_coco.json", karpathy_coco(tmp_path / "coco"))
    assert_fails("image_root", read_karpathy, path, tmp_path / "wrong", on_error="skip")


# --- COCO captions ------------------------------------------------------------------------------


def coco_captions(root: Path) -> dict[str, Any]:
    touch(root / "COCO_val2014_000000391895.jpg", root / "COCO_val2014_000000000042.jpg")
    touch(root / "COCO_val2014_000000000073.jpg")
    return {
        "info": {"description": "COCO 2014 Dataset"},
        "licenses": [],
        "images": [
            {
                "id": 391895,
                "file_name": "COCO_val2014_000000391895.jpg",
                "width": 640,
                "height": 360,
            },
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640, "height": 478},
            {"id": 73, "file_name": "COCO_val2014_000000000073.jpg", "width": 640, "height": 480},
        ],
        "annotations": [
            {"image_id": 42, "id": 10, "caption": "A dog on a couch.\n"},
            {"image_id": 391895, "id": 11, "caption": "A man riding a moped."},
            {"image_id": 42, "id": 12, "caption": " A brown dog."},
        ],
    }


def test_coco_happy_path(tmp_path: Path) -> None:
    root = tmp_path / "val2014"
    path = write_json(tmp_path / "captions_val2014.json", coco_captions(root))
    result = read_coco(path, root, split="val")
    assert result == ReadResult(
        items=[
            item(
                "391895", [root / "COCO_val2014_000000391895.jpg"], ["A man riding a moped."], "val"
            ),
            item(
                "42",
                [root / "COCO_val2014_000000000042.jpg"],
                ["A dog on a couch.", "A brown dog."],
                "val",
            ),
            # Images without annotations are kept with no captions.
            item("73", [root / "COCO_val2014_000000000073.jpg"], [], "val"),
        ],
        skipped=[],
        source=path,
    )


def test_coco_image_info_file_without_annotations(tmp_path: Path) -> None:
    root = tmp_path / "test2014"
    data = coco_captions(root)
    del data["annotations"]
    path = write_json(tmp_path / "image_info_test2014.json", data)
    result = read_coco(path, root, split="test")
    assert [(i.id, i.captions, i.split) for i in result.items] == [
        ("391895", (), "test"),
        ("42", (), "test"),
        ("73", (), "test"),
    ]


@pytest.mark.parametrize(
    ("change", "where", "problem"),
    [
        (
            lambda d: d["annotations"][1].update(image_id=5),
            "annotations[1] (id 11)",
            "'image_id' 5 is not in 'images'",
        ),
        (
            lambda d: d["annotations"][2].pop("caption"),
            "annotations[2] (id 12)",
            "missing field 'caption'",
        ),
        (
            lambda d: d["annotations"][0].update(caption=["x"]),
            "annotations[0] (id 10)",
            "'caption' must be a caption string, got an array",
        ),
        (
            lambda d: d["annotations"][0].update(image_id="42"),
            "annotations[0] (id 10)",
            "'image_id' must be an integer",
        ),
        (
            lambda d: d["images"][2].pop("file_name"),
            "images[2] (id 73)",
            "missing field 'file_name'",
        ),
        (lambda d: d["images"][2].update(id=42), "images[2] (id 42)", "duplicate image id 42"),
        (
            lambda d: d["images"][2].update(file_name="gone.jpg"),
            "images[2] (id 73)",
            "file not found: ",
        ),
    ],
)
def test_coco_malformed_entry(tmp_path: Path, change: Any, where: str, problem: str) -> None:
    root = tmp_path / "val2014"
    data = coco_captions(root)
    change(data)
    path = write_json(tmp_path / "captions_val2014.json", data)

    message = assert_fails(f"{path}: {where}: {problem}", read_coco, path, root, split="val")
    assert "on_error='skip'" in message

    result = read_coco(path, root, split="val", on_error="skip")
    assert len(result.skipped) == 1
    assert result.skipped[0].startswith(f"{path}: {where}: ")
    assert {i.id for i in result.items} >= {"391895", "42"}


def test_coco_annotations_of_a_skipped_image_are_not_reported_twice(tmp_path: Path) -> None:
    root = tmp_path / "val2014"
    data = coco_captions(root)
    data["images"][1]["file_name"] = 42  # two annotations point at this image
    path = write_json(tmp_path / "captions_val2014.json", data)
    result = read_coco(path, root, split="val", on_error="skip")
    assert [i.id for i in result.items] == ["391895", "73"]
    assert len(result.skipped) == 1


def test_coco_instances_file_is_rejected(tmp_path: Path) -> None:
    data = {"images": [], "annotations": [{"image_id": 1, "id": 1, "bbox": [0, 0, 1, 1]}]}
    path = write_json(tmp_path / "instances_val2014.json", data)
    assert_fails("captions file", read_coco, path, tmp_path, split="val")


def test_coco_split_must_be_known(tmp_path: Path) -> None:
    path = write_json(tmp_path / "captions_val2014.json", coco_captions(tmp_path))
    with pytest.raises(ConfigError, match="split"):
        read_coco(path, tmp_path, split="validation")


# --- MSR-VTT ------------------------------------------------------------------------------------


def msrvtt(root: Path) -> dict[str, Any]:
    touch(root / "video0.mp4", root / "video6513.mp4", root / "video7010.mp4")

    def video(video_id: str, split: str, index: int) -> dict[str, Any]:
        return {
            "category": 9,
            "url": f"https://www.youtube.com/watch?v={video_id}",
            "video_id": video_id,
            "start time": 137.72,
            "end time": 149.44,
            "split": split,
            "id": index,
        }

    return {
        "info": {"contributor": "Microsoft MSM group", "year": "2016"},
        "videos": [
            video("video0", "train", 0),
            video("video6513", "validate", 6513),
            video("video7010", "test", 7010),
        ],
        "sentences": [
            {"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
            {"caption": "a man talks ", "video_id": "video6513", "sen_id": 1},
            {"caption": "a red car drives", "video_id": "video0", "sen_id": 2},
        ],
    }


def test_msrvtt_happy_path(tmp_path: Path) -> None:
    root = tmp_path / "TrainValVideo"
    path = write_json(tmp_path / "videodatainfo.json", msrvtt(root))
    result = read_msrvtt(path, root)
    assert result == ReadResult(
        items=[
            item(
                "video0",
                [root / "video0.mp4"],
                ["a car is shown", "a red car drives"],
                "train",
                "video",
            ),
            item("video6513", [root / "video6513.mp4"], ["a man talks"], "val", "video"),
            item("video7010", [root / "video7010.mp4"], [], "test", "video"),
        ],
        skipped=[],
        source=path,
    )
    assert [i.meta for i in result.items] == [{"category": 9}] * 3


@pytest.mark.parametrize(
    ("change", "where", "problem"),
    [
        (
            lambda d: d["videos"][2].update(split="val"),
            "videos[2] (video_id video7010)",
            "'split' must be one of train, validate, test",
        ),
        (lambda d: d["videos"][2].pop("video_id"), "videos[2]", "missing field 'video_id'"),
        (
            lambda d: d["videos"][2].update(video_id="video0"),
            "videos[2] (video_id video0)",
            "duplicate video id 'video0'; every video needs a unique id",
        ),
        (
            lambda d: d["videos"][2].update(video_id="video9"),
            "videos[2] (video_id video9)",
            "file not found: ",
        ),
        (
            lambda d: d["sentences"][1].update(video_id="video9"),
            "sentences[1] (sen_id 1)",
            "'video_id' 'video9' is not in 'videos'",
        ),
        (
            lambda d: d["sentences"][1].update(caption=5),
            "sentences[1] (sen_id 1)",
            "'caption' must be a caption string, got a number",
        ),
    ],
)
def test_msrvtt_malformed_entry(tmp_path: Path, change: Any, where: str, problem: str) -> None:
    root = tmp_path / "videos"
    data = msrvtt(root)
    change(data)
    path = write_json(tmp_path / "videodatainfo.json", data)

    assert_fails(f"{path}: {where}: {problem}", read_msrvtt, path, root)

    result = read_msrvtt(path, root, on_error="skip")
    assert len(result.skipped) == 1
    assert [i.id for i in result.items][:2] == ["video0", "video6513"]


# --- load_dataset -------------------------------------------------------------------------------


def test_load_dataset_detects_a_manifest(manifest: Path) -> None:
    assert load_dataset(manifest) == read_manifest(manifest)


def test_load_dataset_detects_karpathy(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_coco.json", karpathy_coco(tmp_path))
    assert load_dataset(path) == read_karpathy(path, tmp_path)


def test_load_dataset_detects_coco_and_its_split_from_the_name(tmp_path: Path) -> None:
    root = tmp_path / "val2014"
    path = write_json(tmp_path / "annotations" / "captions_val2014.json", coco_captions(root))
    assert load_dataset(path, root=root) == read_coco(path, root, split="val")
    assert {i.split for i in load_dataset(path, root=root, split="test").items} == {"test"}


def test_load_dataset_needs_a_split_for_an_unnamed_coco_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "captions.json", coco_captions(tmp_path))
    assert_fails("pass split=", load_dataset, path)
    assert len(load_dataset(path, split="train").items) == 3


def test_load_dataset_detects_msrvtt(tmp_path: Path) -> None:
    path = write_json(tmp_path / "videodatainfo.json", msrvtt(tmp_path / "videos"))
    assert load_dataset(path, root=tmp_path / "videos") == read_msrvtt(path, tmp_path / "videos")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_load_dataset_filters_a_split(tmp_path: Path, manifest: Path, split: str) -> None:
    karpathy = write_json(tmp_path / "k" / "dataset_coco.json", karpathy_coco(tmp_path / "k"))
    videos = write_json(tmp_path / "v" / "videodatainfo.json", msrvtt(tmp_path / "v"))
    for path in (manifest, karpathy, videos):
        every = load_dataset(path).items
        kept = load_dataset(path, split=split).items
        assert kept == [i for i in every if i.split == split]
        assert kept


def test_load_dataset_checks_only_the_files_of_the_wanted_split(tmp_path: Path) -> None:
    data = karpathy_coco(tmp_path)
    for image in (tmp_path / "train2014").iterdir():
        image.unlink()  # only val2014 was downloaded
    path = write_json(tmp_path / "dataset_coco.json", data)
    assert [i.id for i in load_dataset(path, split="test").items] == ["391895"]
    assert_fails("images[1] (id 9): file not found", load_dataset, path, split="train")


def test_load_dataset_rejects_an_unknown_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "other.json", {"data": []})
    assert_fails(f"{path}: unknown dataset format", load_dataset, path)


def test_load_dataset_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text("{not json", encoding="utf-8")
    assert_fails(f"{path}: not valid JSON", load_dataset, path, on_error="skip")


def test_load_dataset_rejects_an_unknown_split(manifest: Path) -> None:
    with pytest.raises(ConfigError, match="split"):
        load_dataset(manifest, split="dev")


# --- ids derived from paths, and duplicates (same-named files in different folders) ----------


def test_same_file_names_in_different_folders_keep_every_item(tmp_path: Path) -> None:
    # The emoji sets' layout: one folder per artist, the same file names in each.
    artists = ("google", "twitter", "facebook")
    names = ("1f600.png", "0023-fe0f-20e3.png")
    touch(*(tmp_path / artist / "64" / name for artist in artists for name in names))
    lines = [
        {"path": f"{artist}/64/{name}", "captions": [f"{artist} {name}"], "split": "train"}
        for artist in artists
        for name in names
    ]
    result = read_manifest(write_jsonl(tmp_path / "manifest.jsonl", lines))
    assert result.skipped == []
    assert [i.id for i in result.items] == [
        f"{artist}/64/{Path(name).stem}" for artist in artists for name in names
    ]


def test_same_named_videos_and_frame_sequences_in_different_folders(tmp_path: Path) -> None:
    touch(tmp_path / "2024" / "IMG_0001.mp4", tmp_path / "2025" / "IMG_0001.mp4")
    frames = {folder: [f"{folder}/walk/{n:03d}.png" for n in range(3)] for folder in ("a", "b")}
    touch(*(tmp_path / frame for paths in frames.values() for frame in paths))
    split_frames = ["a/walk/000.png", "b/walk/001.png"]  # one sequence across two folders
    lines = [
        {"path": "2024/IMG_0001.mp4", "captions": ["one"], "split": "train"},
        {"path": "2025/IMG_0001.mp4", "captions": ["two"], "split": "train"},
        {"paths": frames["a"], "captions": ["three"], "split": "val"},
        {"paths": frames["b"], "captions": ["four"], "split": "val"},
        {"paths": split_frames, "captions": ["five"], "split": "val"},
    ]
    result = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines))
    assert [(i.id, i.kind) for i in result.items] == [
        ("2024/IMG_0001", "video"),
        ("2025/IMG_0001", "video"),
        ("a/walk", "video"),  # a sequence in one folder is named by the folder
        ("b/walk", "video"),
        ("a/walk/000", "video"),  # otherwise by its first frame
    ]


def test_a_file_listed_twice_is_one_item_with_both_lines_captions(tmp_path: Path) -> None:
    touch(tmp_path / "cat.jpg")
    lines = [
        {"path": "cat.jpg", "captions": ["a cat"], "split": "train", "meta": {"a": 1}},
        {"path": "cat.jpg", "captions": ["a sleeping cat"], "split": "train", "meta": {"b": 2}},
    ]
    result = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines))
    assert result.items == [
        item("cat", [tmp_path / "cat.jpg"], ["a cat", "a sleeping cat"], "train")
    ]
    assert result.items[0].meta == {"a": 1, "b": 2}


def test_a_file_listed_in_two_splits_is_reported_by_name(tmp_path: Path) -> None:
    touch(tmp_path / "cat.jpg")
    lines = [
        {"path": "cat.jpg", "captions": ["a cat"], "split": "train"},
        {"path": "cat.jpg", "captions": ["a cat"], "split": "test"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    assert_fails(
        f"line 2: {tmp_path / 'cat.jpg'} is listed on line 1 with split 'train' and here with "
        "split 'test'",
        read_manifest,
        path,
    )


def test_same_stem_other_extension_gets_the_line_number(tmp_path: Path) -> None:
    touch(tmp_path / "photo.jpg", tmp_path / "photo.png")
    lines = [
        {"path": "photo.jpg", "captions": ["x"], "split": "train"},
        {"path": "photo.png", "captions": ["y"], "split": "train"},
    ]
    result = read_manifest(write_jsonl(tmp_path / "m.jsonl", lines))
    assert [i.id for i in result.items] == ["photo", "photo#2"]


def test_explicit_duplicate_ids_stay_an_error_across_folders(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg")
    lines = [
        {"id": "x", "path": "a/x.jpg", "captions": ["x"], "split": "train"},
        {"id": "x", "path": "b/x.jpg", "captions": ["y"], "split": "train"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    assert_fails("line 2: duplicate id 'x' (first on line 1)", read_manifest, path)


def test_m4v_and_mpg_are_videos_as_everywhere_else(tmp_path: Path) -> None:
    touch(tmp_path / "a.m4v", tmp_path / "b.mpg")
    lines = [{"path": n, "captions": [], "split": "test"} for n in ("a.m4v", "b.mpg")]
    assert [i.kind for i in read_manifest(write_jsonl(tmp_path / "m.jsonl", lines)).items] == [
        "video",
        "video",
    ]


def test_karpathy_without_numeric_ids_uses_the_relative_path(tmp_path: Path) -> None:
    touch(tmp_path / "train" / "1.jpg", tmp_path / "val" / "1.jpg")
    entries = [
        {"filepath": folder, "filename": "1.jpg", "split": "train", "sentences": []}
        for folder in ("train", "val")
    ]
    path = write_json(tmp_path / "dataset.json", {"images": entries})
    assert [i.id for i in read_karpathy(path, tmp_path).items] == ["train/1", "val/1"]


# --- the skipped-share guard ------------------------------------------------------------------


def _manifest_with_bad_lines(tmp_path: Path, good: int, bad: int) -> Path:
    touch(*(tmp_path / f"{n}.jpg" for n in range(good)))
    lines: list[Any] = [
        {"path": f"{n}.jpg", "captions": ["c"], "split": "train" if n % 2 else "val"}
        for n in range(good)
    ]
    lines += [{"path": f"missing-{n}.jpg", "captions": ["c"], "split": "train"} for n in range(bad)]
    return write_jsonl(tmp_path / "m.jsonl", lines)


def test_check_skipped_names_the_count_and_the_first_cause(tmp_path: Path) -> None:
    path = _manifest_with_bad_lines(tmp_path, good=18, bad=2)
    result = load_dataset(path, split="train", on_error="skip")
    assert len(result.items) == 9 and result.entries == 20  # entries of every split count
    with pytest.raises(DatasetError) as caught:
        check_skipped(result, 0.05, allow_hint="--max-skipped-share")
    message = str(caught.value)
    assert "skipped 2 of 20 entries (10.0%), more than the 5% allowed" in message
    assert "file not found: " in message and "missing-" in message
    assert message.endswith("accept a larger share with --max-skipped-share")
    assert check_skipped(result, 0.10, allow_hint="x") is result  # exactly at the limit: kept


def test_check_skipped_passes_a_clean_read(tmp_path: Path) -> None:
    result = load_dataset(_manifest_with_bad_lines(tmp_path, good=4, bad=0), on_error="skip")
    assert check_skipped(result, 0.0, allow_hint="x").items == result.items


def test_check_skipped_counts_coco_annotations_as_entries(tmp_path: Path) -> None:
    touch(tmp_path / "1.jpg")
    data = {
        "images": [{"id": 1, "file_name": "1.jpg"}],
        "annotations": [{"image_id": 1, "id": n, "caption": "a cat"} for n in range(9)]
        + [{"image_id": 1, "id": 9, "caption": 5}],
    }
    result = read_coco(
        write_json(tmp_path / "c.json", data), tmp_path, split="val", on_error="skip"
    )
    assert result.entries == 11  # one image and ten annotations
    check_skipped(result, 0.1, allow_hint="x")
    with pytest.raises(DatasetError, match="skipped 1 of 11 entries"):
        check_skipped(result, 0.05, allow_hint="x")


def test_only_a_coco_file_reads_as_having_no_splits(tmp_path: Path, manifest: Path) -> None:
    # Its items all get the split they are read as, so its "train" and "val" are the same media.
    root = tmp_path / "val2014"
    coco = write_json(tmp_path / "captions_val2014.json", coco_captions(root))
    assert load_dataset(coco, root=root, split="train").has_splits is False
    assert load_dataset(manifest).has_splits is True
    karpathy = write_json(tmp_path / "dataset_coco.json", karpathy_coco(tmp_path / "coco"))
    assert load_dataset(karpathy, root=tmp_path / "coco").has_splits is True
