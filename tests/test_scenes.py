"""Tests for the scenes corpus generator, its caption grammar and its caption parser."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from captioner.data import scenes_grammar
from captioner.data.scenes import (
    COLOURS,
    MOTIONS,
    PALETTE,
    SHAPES,
    ParsedCaption,
    clip_captions,
    generate_corpus,
    image_captions,
    parse_caption,
    render_clip,
    render_scene,
    score_caption,
    write_video,
)
from captioner.errors import ConfigError, DatasetError

SIZE = 64  # small frames keep the tests fast; layout works in fractions of the side
NUM_IMAGES, NUM_VIDEOS = 30, 12


def _generate(out_dir: Path, seed: int) -> Path:
    return generate_corpus(out_dir, NUM_IMAGES, NUM_VIDEOS, seed, image_size=SIZE)


def _records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("scenes") / "a", seed=7)


def _files(manifest: Path) -> dict[str, bytes]:
    root = manifest.parent
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_writes_identical_bytes(corpus: Path, tmp_path: Path) -> None:
    again = _generate(tmp_path / "b", seed=7)
    assert _files(again) == _files(corpus)  # manifest, every PNG and every mp4


def test_different_seed_writes_different_data(corpus: Path, tmp_path: Path) -> None:
    other = _generate(tmp_path / "c", seed=8)
    assert other.read_text() != corpus.read_text()
    a, b = _files(corpus), _files(other)
    assert all(a[name] != b[name] for name in a if name.startswith("images/"))


def test_manifest_counts_paths_and_splits(corpus: Path) -> None:
    records = _records(corpus)
    assert [r["id"] for r in records] == [f"img-{i:06d}" for i in range(NUM_IMAGES)] + [
        f"vid-{i:06d}" for i in range(NUM_VIDEOS)
    ]
    for record in records:
        assert set(record) == {"id", "path", "kind", "captions", "split", "meta"}
        assert (corpus.parent / record["path"]).is_file()
        suffix = ".png" if record["kind"] == "image" else ".mp4"
        assert record["path"] == f"{record['kind']}s/{record['id']}{suffix}"
    splits = {
        kind: Counter(r["split"] for r in records if r["kind"] == kind)
        for kind in ("image", "video")
    }
    assert splits["image"] == {"train": 24, "val": 3, "test": 3}
    assert splits["video"] == {"train": 10, "val": 1, "test": 1}


def test_every_item_has_five_distinct_lowercase_captions_that_score_correct(corpus: Path) -> None:
    for record in _records(corpus):
        captions = record["captions"]
        assert len(captions) == len(set(captions)) == 5
        assert all(caption == caption.lower().strip() for caption in captions)
        for caption in captions:
            expected = {"attributes": True}
            if record["kind"] == "video":
                expected["motion"] = True
            assert score_caption(caption, record["meta"]) == expected, caption


def test_images_are_the_right_size(corpus: Path) -> None:
    from PIL import Image

    for record in _records(corpus):
        if record["kind"] == "image":
            with Image.open(corpus.parent / record["path"]) as image:
                assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))


def test_generated_captions_score_correct_on_200_scenes() -> None:
    """The key self-consistency check: every caption the grammar writes scores as true."""
    scene_types: Counter[str] = Counter()
    for index in range(200):
        rng = np.random.default_rng([0, index])
        _, meta = render_scene(rng, SIZE)
        scene_types[meta["scene"]] += 1
        assert 1 <= len(meta["objects"]) <= 3
        assert all(obj["extent"] >= 0.22 for obj in meta["objects"])
        assert len({obj["colour"] for obj in meta["objects"]}) == len(meta["objects"])
        captions = image_captions(meta, rng)
        assert len(set(captions)) == 5
        for caption in captions:
            assert score_caption(caption, meta) == {"attributes": True}, (caption, meta)
            assert parse_caption(caption).motion is None, caption  # relations are not motion
    assert set(scene_types) == {"one_object", "two_objects", "three_objects"}
    assert 0.25 < scene_types["one_object"] / 200 < 0.45
    assert 0.30 < scene_types["two_objects"] / 200 < 0.50
    assert 0.15 < scene_types["three_objects"] / 200 < 0.35


def _centre_and_area(frame: np.ndarray, colour: str) -> tuple[np.ndarray, int]:
    """The centroid (x, y, as fractions) and pixel count of one palette colour in a frame."""
    distance = np.linalg.norm(frame.astype(float) - PALETTE[colour], axis=2)
    ys, xs = np.nonzero(distance < 45)
    return np.array([xs.mean(), ys.mean()]) / frame.shape[0], len(xs)


def _assert_moves(frames: list[np.ndarray], meta: dict) -> None:
    mover = meta["objects"][meta["motion"]["object"]]
    (x0, y0), area0 = _centre_and_area(frames[0], mover["colour"])
    (x1, y1), area1 = _centre_and_area(frames[-1], mover["colour"])
    kind = meta["motion"]["kind"]
    travel = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
    if kind in travel:
        assert travel[kind] > 0.3, (kind, x0, y0, x1, y1)
        assert abs(x1 - x0 if kind in ("up", "down") else y1 - y0) < 0.05
        assert 0.7 < area1 / area0 < 1.4
    else:
        assert (area1 / area0 > 2.5) if kind == "grow" else (area0 / area1 > 2.5), (area0, area1)


def test_generated_clips_move_as_captioned_on_120_clips() -> None:
    kinds: Counter[str] = Counter()
    object_counts: Counter[int] = Counter()
    for index in range(120):
        rng = np.random.default_rng([1, index])
        frames, meta = render_clip(rng, SIZE)
        kinds[meta["motion"]["kind"]] += 1
        object_counts[len(meta["objects"])] += 1
        assert len(frames) == meta["num_frames"] and 8 <= meta["num_frames"] <= 16
        assert all(frame.shape == (SIZE, SIZE, 3) for frame in frames)
        _assert_moves(frames, meta)
        for caption in clip_captions(meta, rng):
            assert score_caption(caption, meta) == {"attributes": True, "motion": True}, caption
    assert set(kinds) == set(MOTIONS) and min(kinds.values()) >= 10
    assert set(object_counts) == {1, 2} and min(object_counts.values()) >= 40


def test_videos_decode_to_the_right_frames_and_motion(corpus: Path) -> None:
    videos = [r for r in _records(corpus) if r["kind"] == "video"]
    for record in videos:
        with av.open(str(corpus.parent / record["path"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name in ("h264", "mpeg4")
            assert (stream.average_rate, stream.format.name) == (8, "yuv420p")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert len(frames) == record["meta"]["num_frames"]
        assert frames[0].shape == (SIZE, SIZE, 3)
        _assert_moves(frames, record["meta"])


def test_write_video_falls_back_to_mpeg4_without_libx264(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames, _ = render_clip(np.random.default_rng(0), SIZE)
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    write_video(tmp_path / "clip.mp4", frames)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "mpeg4"
        assert len(list(container.decode(stream))) == len(frames)


# --- parser -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "objects"),
    [
        ("a red circle", [("red", "circle")]),
        ("A Red Circle.", [("red", "circle")]),
        ("a red circle and a blue square", [("red", "circle"), ("blue", "square")]),
        (
            "a small red circle to the left of a big blue square on a gray background",
            [("red", "circle"), ("blue", "square")],
        ),
        ("there is a white star, a green hexagon and an orange diamond", None),
        ("a red small circle", [("red", "circle")]),
        ("red", []),
        ("a circle", []),
        ("a circle that is red", []),
        ("a red and blue square", [("blue", "square")]),
        ("a red, square", []),
        ("a gray square on a gray background", []),
        ("the sky is blue and the square is round", []),
    ],
)
def test_parse_objects(text: str, objects: list | None) -> None:
    if objects is None:
        objects = [("white", "star"), ("green", "hexagon"), ("orange", "diamond")]
    assert parse_caption(text).objects == objects


@pytest.mark.parametrize(
    ("text", "motion"),
    [
        ("a red circle moves to the left", "left"),
        ("a red circle is moving left", "left"),
        ("a red circle slides left past a blue square", "left"),
        ("a red circle moving slowly towards the right", "right"),
        ("a red circle moves from left to right", "right"),
        ("a red circle goes from the right to the left", "left"),
        ("a red circle goes upward", "up"),
        ("a red circle rises", "up"),
        ("a red circle falls", "down"),
        ("a red circle drifts downwards", "down"),
        ("a green star grows bigger", "grow"),
        ("a green star is getting larger", "grow"),
        ("a green star increases in size", "grow"),
        ("a purple hexagon shrinks", "shrink"),
        ("a purple hexagon gets smaller", "shrink"),
        ("a purple hexagon grows smaller", "shrink"),
        ("a red circle to the left of a blue square", None),
        ("a large red circle above a small blue square", None),
        ("a red circle does not move left", None),
        ("a red circle doesn't grow", None),
        ("a red circle moves", None),
        ("a red circle moves left and then moves right", None),
    ],
)
def test_parse_motion(text: str, motion: str | None) -> None:
    assert parse_caption(text).motion == motion


def test_every_grammar_motion_phrase_parses_to_its_kind() -> None:
    for kind, phrases in scenes_grammar._MOTION_PHRASES.items():
        for phrase in phrases:
            assert parse_caption(f"a red circle {phrase}") == ParsedCaption(
                [("red", "circle")], kind, 0
            ), phrase
    for phrase in scenes_grammar._STILL_PHRASES:
        assert parse_caption(f"a red circle {phrase}").motion is None, phrase


def test_the_parser_reads_words_as_the_vocab_does_and_ends_phrases_at_punctuation() -> None:
    # One tokenizer: vocab.tokenize splits clitics ("does n't") and normalises the curly
    # apostrophe, so every spelling of a negation is one word to the parser.
    for negated in ("doesn't", "doesn\u2019t", "isn't", "does not", "never"):
        assert parse_caption(f"a red circle {negated} move left").motion is None, negated
    assert parse_caption("A RED CIRCLE MOVES LEFT") == ParsedCaption([("red", "circle")], "left", 0)
    # Where they differ: the vocab drops punctuation (the model writes none), but for the
    # parser it ends a phrase, so words on either side never make one object or one motion.
    assert parse_caption("the circle is red, square ones are blue").objects == []
    assert parse_caption("the circle is red square").objects == [("red", "square")]
    assert parse_caption("a red circle moves. left is a blue square").motion is None


def test_parse_attributes_motion_to_the_nearest_preceding_object() -> None:
    parsed = parse_caption("a blue square stays still while a red circle moves left")
    assert parsed == ParsedCaption([("blue", "square"), ("red", "circle")], "left", 1)
    parsed = parse_caption("moving left, a red circle passes a blue square")
    assert (parsed.motion, parsed.mover) == ("left", 0)


def test_vocabulary_keeps_backgrounds_out_of_object_colours() -> None:
    assert len(SHAPES) >= 6 and len(COLOURS) >= 7
    assert not {"gray", "grey", "black"} & set(COLOURS)


# --- scoring ----------------------------------------------------------------------------------

IMAGE_META = {
    "scene": "two_objects",
    "objects": [
        {"shape": "circle", "colour": "red", "size": "small", "x": 0.3, "y": 0.5},
        {"shape": "square", "colour": "blue", "size": "large", "x": 0.7, "y": 0.5},
    ],
    "relation": "left of",
    "background": "plain",
}
CLIP_META = {
    "scene": "motion",
    "objects": IMAGE_META["objects"],
    "motion": {"object": 0, "kind": "left", "end": {"x": 0.2, "y": 0.5, "extent": 0.25}},
    "num_frames": 12,
    "background": "noise",
}


@pytest.mark.parametrize(
    ("text", "correct"),
    [
        ("a small red circle to the left of a blue square", True),
        ("a blue square to the right of a red circle on a gray background", True),
        ("a blue circle to the left of a red square", False),  # colours swapped
        ("a red circle", False),  # an object missing
        ("a red circle, a blue square and a green star", False),  # an extra object
        ("a red circle, a red circle and a blue square", False),  # one counted twice
        ("a red square and a blue circle", False),  # shapes swapped
        ("red and blue circle and square", False),
    ],
)
def test_score_image_attributes(text: str, correct: bool) -> None:
    assert score_caption(text, IMAGE_META) == {"attributes": correct}


@pytest.mark.parametrize(
    ("text", "attributes", "motion"),
    [
        ("a red circle slides left past a blue square", True, True),
        ("a blue square stays still while a red circle moves to the left", True, True),
        ("a red circle moves left", False, True),
        ("a red circle moves right past a blue square", True, False),  # reversed direction
        ("a red circle grows next to a blue square", True, False),  # wrong kind of motion
        ("a blue square moves left past a red circle", True, False),  # the wrong object moves
        ("a blue circle moves left past a red square", False, False),  # colours swapped
        ("a red circle and a blue square", True, False),  # no motion at all
        ("a red circle does not move left and a blue square", True, False),
    ],
)
def test_score_clip_motion(text: str, attributes: bool, motion: bool) -> None:
    assert score_caption(text, CLIP_META) == {"attributes": attributes, "motion": motion}


def test_score_rejects_malformed_meta() -> None:
    with pytest.raises(DatasetError, match="meta is malformed"):
        score_caption("a red circle", {"scene": "one_object"})
    with pytest.raises(DatasetError):
        score_caption("a red circle", {**CLIP_META, "motion": {"object": 5, "kind": "left"}})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_images": -1},
        {"seed": -3},
        {"image_size": 63},
        {"image_size": 16},
        {"val_fraction": 0.6, "test_fraction": 0.5},
        {"test_fraction": -0.1},
    ],
)
def test_generate_corpus_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    arguments = {"num_images": 1, "num_videos": 0, "seed": 0, **kwargs}
    with pytest.raises(ConfigError):
        generate_corpus(tmp_path, **arguments)
    assert not (tmp_path / "manifest.jsonl").exists()
