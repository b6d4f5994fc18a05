"""Tests for the emoji development set: captions, splits, manifests, the cache and the download.

Every test builds small fake ``emoji-datasource-*`` tarballs; none runs npm or needs a network.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.data import emoji
from captioner.data.emoji import (
    SCHEMES,
    EmojiImage,
    default_cache_dir,
    emoji_caption,
    prepare_emoji,
    split_images,
)
from captioner.data.readers import read_manifest
from captioner.errors import DatasetError

ALL = {"has_img_google": True, "has_img_twitter": True, "has_img_facebook": True}


def _entry(name: str, image: str, variants: dict[str, str] | None = None, **fields) -> dict:
    """An emoji.json entry drawn by every artist unless ``fields`` say otherwise."""
    entry = {"name": name, "unified": image.removesuffix(".png").upper(), "image": image}
    entry |= {**ALL, **fields}
    if variants:
        entry["skin_variations"] = {
            tone: {"unified": file.removesuffix(".png").upper(), "image": file, **ALL}
            for tone, file in variants.items()
        }
    return entry


HANDS = "1f9d1-200d-1f91d-200d-1f9d1"
ENTRIES = [
    _entry("GRINNING FACE", "1f600.png", category="Smileys"),
    _entry("Egypt Flag", "1f1ea-1f1ec.png"),
    _entry("THUMBS UP SIGN", "1f44d.png", {"1F3FD": "1f44d-1f3fd.png"}),
    _entry(
        "PEOPLE HOLDING HANDS",
        f"{HANDS}.png",
        {
            "1F3FB-1F3FF": "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff.png",
            "1F3FB-1F3FB": "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fb.png",
        },
    ),
    _entry("HASH KEY", "0023-fe0f-20e3.png", has_img_facebook=False),  # facebook never drew it
    _entry("BALLET SHOES", "1fa70.png"),  # listed for twitter, but not in its package (ABSENT)
]
ABSENT = {("twitter", "1fa70.png")}
IMAGES = {"google": 9, "twitter": 8, "facebook": 8}  # what each fake package holds
SMALL = (2, 1, 1)


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _file_names(artist: str) -> list[str]:
    names = []
    for entry in ENTRIES:
        for variant in [entry, *entry.get("skin_variations", {}).values()]:
            if variant[f"has_img_{artist}"] and (artist, variant["image"]) not in ABSENT:
                names.append(variant["image"])
    return names


def write_package(dest: Path, artist: str, extra: tuple[str, ...] = ()) -> Path:
    """A tarball shaped like ``npm pack emoji-datasource-<artist>``'s, with 4x4 images.

    ``extra`` names more members (PNGs) added at the end.
    """
    tarball = dest / f"emoji-datasource-{artist}-{emoji.VERSION}.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        _add(archive, "package/package.json", b"{}")
        _add(archive, "package/emoji.json", json.dumps(ENTRIES).encode())
        _add(archive, f"package/img/{artist}/sheets/64.png", _png(0))  # not wanted
        for index, name in enumerate(_file_names(artist)):
            _add(archive, f"package/img/{artist}/64/{name}", _png(index))
        for name in extra:
            _add(archive, name, _png(1))
    return tarball


class FakeNpm:
    """A download function that writes a fake package and records what it was asked for."""

    def __init__(self) -> None:
        self.specs: list[str] = []

    def __call__(self, spec: str, dest: Path) -> Path:
        self.specs.append(spec)
        name, _, version = spec.partition("@")
        assert version == emoji.VERSION
        return write_package(dest, name.removeprefix("emoji-datasource-"))


def _refuse_download(spec: str, dest: Path) -> Path:
    raise AssertionError(f"downloaded {spec} although it is cached")


def _records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], FakeNpm]:
    cache = tmp_path_factory.mktemp("emoji-cache")
    npm = FakeNpm()
    manifests = prepare_emoji(SCHEMES, cache, download=npm, small_sizes=SMALL)
    return cache, manifests, npm


@pytest.mark.parametrize(
    ("name", "skin_tone", "caption"),
    [
        ("GRINNING FACE", None, "grinning face"),
        ("Egypt Flag", None, "flag of egypt"),
        ("WHITE FLAG", None, "white flag"),
        ("THUMBS UP SIGN", "1F3FD", "thumbs up sign with medium skin tone"),
        ("THUMBS UP SIGN", "1f3fe", "thumbs up sign with medium-dark skin tone"),
        (
            "PEOPLE HOLDING HANDS",
            "1F3FB-1F3FF",
            "people holding hands with light skin tone and dark skin tone",
        ),
        ("PEOPLE HOLDING HANDS", "1F3FC-1F3FC", "people holding hands with medium-light skin tone"),
        ("St. Kitts & Nevis Flag", None, "flag of saint kitts and nevis"),
        ("U.S. Virgin Islands Flag", None, "flag of us virgin islands"),
        ("Côte d’Ivoire Flag", None, "flag of cote d'ivoire"),
        ("Cocos (Keeling) Islands Flag", None, "flag of cocos keeling islands"),
        ("Congo - Kinshasa Flag", None, "flag of congo kinshasa"),
        ("Guinea-Bissau Flag", None, "flag of guinea-bissau"),
        ("RESCUE WORKER’S HELMET", None, "rescue worker's helmet"),
        ("KEYCAP: *", None, "keycap with asterisk"),
        ("MAN: RED HAIR", "1F3FF", "man with red hair with dark skin tone"),
        ("WOMAN: BALD", None, "bald woman"),
        ("FAMILY: MAN, WOMAN, BOY", None, "family of man, woman and boy"),
        (
            "KISS: WOMAN, MAN",
            "1F3FB-1F3FD",
            "kiss of woman and man with light skin tone and medium skin tone",
        ),
    ],
)
def test_captions_are_natural_lower_case_phrases(
    name: str, skin_tone: str | None, caption: str
) -> None:
    assert emoji_caption(name, skin_tone) == caption


@pytest.mark.parametrize(("name", "skin_tone"), [("THUMBS UP SIGN", "1F3FA"), ("(?)", None)])
def test_uncaptionable_names_and_tones_are_errors(name: str, skin_tone: str | None) -> None:
    with pytest.raises(DatasetError):
        emoji_caption(name, skin_tone)


def test_manifests_read_back_with_every_item_and_unique_explicit_ids(prepared) -> None:
    cache, manifests, _ = prepared
    assert manifests == [cache / f"manifest-{scheme}.jsonl" for scheme in SCHEMES]
    for manifest in manifests:
        result = read_manifest(manifest)
        records = _records(manifest)
        assert result.skipped == []
        assert [item.id for item in result.items] == [record["id"] for record in records]
        assert len({item.id for item in result.items}) == len(records)
        for item, record in zip(result.items, records, strict=True):
            artist, stem = record["id"].split("/")
            assert record["path"] == f"img/{artist}/64/{stem}.png"
            assert item.paths == (cache / record["path"],)
            assert item.kind == "image"
            assert len(item.captions) == 1
    records = {r["id"]: r for r in _records(cache / "manifest-random.jsonl")}
    assert records["google/1f600"]["captions"] == ["grinning face"]
    assert records["google/1f600"]["meta"] == {
        "artist": "google",
        "name": "GRINNING FACE",
        "unified": "1F600",
        "category": "Smileys",
    }
    assert records["facebook/1f44d-1f3fd"]["captions"] == ["thumbs up sign with medium skin tone"]
    assert records["twitter/1f44d-1f3fd"]["meta"]["skin_tone"] == "1F3FD"
    assert records["google/1f1ea-1f1ec"]["captions"] == ["flag of egypt"]
    # Only images the artist drew and the package holds.
    assert "facebook/0023-fe0f-20e3" not in records
    assert "twitter/1fa70" not in records
    assert Counter(record["meta"]["artist"] for record in records.values()) == IMAGES


def test_fake_package_holds_what_the_manifest_lists(prepared) -> None:
    cache, _, npm = prepared
    assert npm.specs == [f"emoji-datasource-{a}@{emoji.VERSION}" for a in emoji.ARTISTS]
    held = sorted(path.name for path in (cache / "img" / "google" / "64").iterdir())
    assert held == sorted(_file_names("google"))
    assert len(held) == IMAGES["google"]
    assert not (cache / "img" / "google" / "sheets").exists()
    assert not list(cache.glob(".download-*"))  # the tarballs are not kept


def test_heldout_artist_manifest_tests_on_twitter_only(prepared) -> None:
    cache, _, _ = prepared
    for record in _records(cache / "manifest-heldout-artist.jsonl"):
        assert (record["split"] == "test") == (record["meta"]["artist"] == "twitter")


def test_cache_is_reused_without_downloading(prepared) -> None:
    cache, manifests, _ = prepared
    before = [manifest.read_bytes() for manifest in manifests]
    again = prepare_emoji(SCHEMES, cache, download=_refuse_download, small_sizes=SMALL)
    assert [manifest.read_bytes() for manifest in again] == before


def test_second_run_does_not_call_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def npm_once(spec: str, dest: Path) -> Path:
        calls.append(spec)
        if len(calls) > 1:
            raise AssertionError(f"npm called again for {spec}")
        return write_package(dest, "google")

    monkeypatch.setattr(emoji, "npm_pack", npm_once)
    [manifest] = prepare_emoji(["small"], tmp_path)
    first = manifest.read_bytes()
    assert prepare_emoji(["small"], tmp_path) == [manifest]
    assert manifest.read_bytes() == first
    assert calls == [f"emoji-datasource-google@{emoji.VERSION}"]


def test_small_scheme_downloads_only_google(tmp_path: Path) -> None:
    npm = FakeNpm()
    [manifest] = prepare_emoji(["small"], tmp_path, download=npm, small_sizes=SMALL)
    assert npm.specs == [f"emoji-datasource-google@{emoji.VERSION}"]
    assert Counter(record["split"] for record in _records(manifest)) == {
        "train": 2,
        "val": 1,
        "test": 1,
    }


def _many(count: int) -> list[EmojiImage]:
    """Every artist's drawing of ``count`` made-up emoji (no files are needed to split)."""
    return [
        EmojiImage(artist, f"{index:05x}.png", f"emoji {index}")
        for artist in emoji.ARTISTS
        for index in range(count)
    ]


def _splits_by_file_name(assigned: list[tuple[EmojiImage, str]]) -> dict[str, set[str]]:
    splits = defaultdict(set)
    for image, split in assigned:
        splits[image.file_name].add(split)
    return splits


def test_heldout_artist_split_rules() -> None:
    assigned = split_images(_many(2000), "heldout-artist")
    assert len(assigned) == 6000
    for image, split in assigned:
        assert (split == "test") == (image.artist == "twitter")
    trained = [(image, split) for image, split in assigned if image.artist != "twitter"]
    assert all(len(splits) == 1 for splits in _splits_by_file_name(trained).values())
    val = sum(split == "val" for _, split in trained) / len(trained)
    assert 0.04 < val < 0.06


def test_random_split_keeps_each_file_name_in_one_split() -> None:
    assigned = split_images(_many(2000), "random")
    assert len(assigned) == 6000
    assert all(len(splits) == 1 for splits in _splits_by_file_name(assigned).values())
    counts = Counter(split for _, split in assigned)
    assert 0.77 < counts["train"] / 6000 < 0.83
    assert 0.08 < counts["val"] / 6000 < 0.12
    assert 0.08 < counts["test"] / 6000 < 0.12


@pytest.mark.parametrize(("count", "sizes"), [(2000, (600, 80, 80)), (100, (30, 4, 4))])
def test_small_split_takes_exact_counts_of_google_only(count: int, sizes: tuple) -> None:
    images = _many(count)
    assigned = split_images(images, "small", sizes)
    assert {image.artist for image, _ in assigned} == {"google"}
    counts = Counter(split for _, split in assigned)
    assert (counts["train"], counts["val"], counts["test"]) == sizes
    # Stable: the same images in another order get the same splits.
    assert sorted(split_images(images[::-1], "small", sizes), key=str) == sorted(assigned, key=str)


def test_unknown_scheme_is_refused_before_any_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown emoji split scheme"):
        prepare_emoji(["everything"], tmp_path, download=_refuse_download)


@pytest.mark.parametrize(
    "member", ["package/../../escaped.png", "/tmp/absolute.png", "package/img/../../../up.png"]
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, member: str) -> None:
    def download(spec: str, dest: Path) -> Path:
        return write_package(dest, "google", extra=(member,))

    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="refusing unsafe member"):
        prepare_emoji(["small"], cache, download=download)
    assert not (cache / "img" / "google").exists()
    assert not list(tmp_path.rglob("escaped.png")) and not list(tmp_path.rglob("up.png"))


def test_linked_members_are_refused(tmp_path: Path) -> None:
    def download(spec: str, dest: Path) -> Path:
        tarball = dest / "linked.tgz"
        with tarfile.open(tarball, "w:gz") as archive:
            link = tarfile.TarInfo("package/emoji.json")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(link)
        return tarball

    with pytest.raises(DatasetError, match="not a regular file"):
        prepare_emoji(["small"], tmp_path, download=download)


def test_missing_npm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(DatasetError, match="npm was not found on PATH"):
        emoji.npm_pack("emoji-datasource-google@16.0.0", tmp_path)


def test_failed_npm_pack_names_npm_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = (
        "npm error code ETARGET\n"
        "npm error notarget No matching version found for emoji-datasource-google@99.\n"
        "npm error A complete log of this run can be found in: /x.log\n"
    )

    def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        assert command[1:3] == ["pack", "emoji-datasource-google@99"]
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji.subprocess, "run", run)
    with pytest.raises(DatasetError) as raised:
        emoji.npm_pack("emoji-datasource-google@99", tmp_path)
    assert str(raised.value) == (
        "npm pack emoji-datasource-google@99 failed: "
        "notarget No matching version found for emoji-datasource-google@99."
    )


def test_cli_prints_manifest_paths_and_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(emoji, "npm_pack", FakeNpm())
    assert main(["data", "emoji", "--split", "small", "--cache", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'manifest-small.jsonl'}\n"

    def fail(spec: str, dest: Path) -> Path:
        raise DatasetError("npm pack failed: offline")

    monkeypatch.setattr(emoji, "npm_pack", fail)
    assert main(["data", "emoji", "--split", "all", "--cache", str(tmp_path / "other")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "captioner: error: npm pack failed: offline\n"


def test_default_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "captioner" / "emoji"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "captioner" / "emoji"
