"""Readers for caption datasets: our JSONL manifest, Karpathy splits, COCO captions, MSR-VTT.

Every reader returns a :class:`ReadResult` of :class:`CaptionItem`, so the rest of the library
never sees a dataset's own format. Each reader checks every item; a malformed item or a missing
media file raises :class:`DatasetError` naming the file and the line or entry, or, with
``on_error="skip"``, is left out, recorded in ``ReadResult.skipped`` and counted in one warning.
A file that is missing or is not valid JSON always raises.

Items without captions (COCO images without annotations, MSR-VTT videos without sentences,
manifest lines with ``"captions": []``) are kept, because inference and test sets have none;
training code must leave them out.

An id a reader derives is unique whenever the paths are: it is the media's path relative to
the dataset's root, without the extension (``google/64/1f600``), never the bare file stem, which
camera folders and per-source exports repeat. Formats with ids of their own keep them.
Skipping is for the odd bad line: :func:`check_skipped` turns a large skipped share into an
error, so that a run never trains on a fraction of its data without being told.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from captioner.config import DEFAULT_MAX_SKIPPED_SHARE
from captioner.data.items import SPLITS, CaptionItem
from captioner.errors import ConfigError, DatasetError
from captioner.media_types import VIDEO_SUFFIXES

__all__ = [
    "DEFAULT_MAX_SKIPPED_SHARE",
    "VIDEO_EXTENSIONS",
    "ReadResult",
    "check_skipped",
    "load_dataset",
    "read_coco",
    "read_karpathy",
    "read_manifest",
    "read_msrvtt",
]

logger = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]

VIDEO_EXTENSIONS = VIDEO_SUFFIXES
"""File extensions a manifest treats as video files when an entry gives no ``kind``."""

KINDS = ("image", "video")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MSRVTT_SPLITS = {"train": "train", "validate": "val", "test": "test"}
MSRVTT_VIDEO_SUFFIX = ".mp4"

_SKIP_HINT = "Fix it, or pass on_error='skip' to skip such items."
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@dataclass
class ReadResult:
    """What a reader found in one dataset file: the items kept and why others were skipped."""

    items: list[CaptionItem]
    skipped: list[str]  # one message per skipped line, entry or annotation
    source: Path  # the dataset file that was read
    # Entries read, in every split, kept or skipped: the denominator of the skipped share.
    entries: int = field(default=0, compare=False)
    # False when the file carries no splits and every item got the one it was read as (COCO):
    # its "train" and "val" items are then the same media.
    has_splits: bool = field(default=True, compare=False)


def check_skipped(result: ReadResult, max_share: float, *, allow_hint: str) -> ReadResult:
    """Raise when more than ``max_share`` of the entries read were skipped; return ``result``.

    ``on_error="skip"`` is for the odd bad line. A reader that drops a large share points at a
    wrong root folder or a systematic problem, and training on what is left is data loss.
    ``allow_hint`` tells the user how to accept a larger share (a flag or a config key).
    """
    skipped, total = len(result.skipped), max(result.entries, len(result.skipped))
    if skipped and skipped > max_share * total:
        raise DatasetError(
            f"{result.source}: skipped {skipped} of {total} entries ({skipped / total:.1%}), "
            f"more than the {max_share:.0%} allowed; first: {result.skipped[0]}. Fix the data, "
            f"or accept a larger share with {allow_hint}"
        )
    return result


def read_manifest(
    path: str | Path,
    *,
    root: str | Path | None = None,
    on_error: OnError = "fail",
    check_files: bool = True,
) -> ReadResult:
    """Read a JSONL manifest: one captioned image, video file or frame sequence per line.

    Each line is ``{"id"?: str, "path": str, "captions": [str, ...], "split": "train"|"val"|
    "test", "kind"?: "image"|"video", "meta"?: {...}}``, with ``"paths": [str, ...]`` instead
    of ``"path"`` for an ordered frame sequence. Relative paths are resolved against ``root``
    (default: the manifest's folder). ``kind`` defaults to "video" for a frame sequence or a
    video file extension (:data:`VIDEO_EXTENSIONS`), else "image". ``id`` defaults to
    :func:`derived_id`: the path relative to the root without its extension, so files of the
    same name in different folders stay apart. An explicit id used twice is an error; a file
    (or frame sequence) listed twice without ids is one item with the captions of both lines,
    and must have the same split and kind on both. ``captions`` may be an empty list
    (inference and test manifests). Blank lines and unknown fields are ignored.
    """
    source = Path(path)
    base = Path(root) if root is not None else source.parent
    return _read_manifest(source, base, on_error, check_files)


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    *,
    on_error: OnError = "fail",
    check_files: bool = True,
) -> ReadResult:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr8k.json``, ...).

    An image's path is ``image_root / filepath / filename`` (only COCO has ``filepath``, e.g.
    "val2014"), so ``image_root`` is the folder that holds ``train2014/`` and ``val2014/`` for
    COCO, or the image folder for Flickr. "restval" images go to the train split, and
    ``meta["karpathy_split"]`` keeps the original split. ``id`` is ``cocoid``, else ``imgid``,
    else ``filepath/filename`` without the extension; captions are the sentences' ``raw``
    text, stripped.
    """
    source = Path(json_path)
    return _read_karpathy(_load_json(source), source, Path(image_root), on_error, check_files)


def read_coco(
    annotations_json: str | Path,
    image_root: str | Path,
    *,
    split: str,
    on_error: OnError = "fail",
    check_files: bool = True,
) -> ReadResult:
    """Read a COCO captions file (``captions_train2014.json``, ``captions_val2017.json``, ...).

    Every item gets ``split``, since COCO files carry none. An image's path is
    ``image_root / file_name`` and its id is the COCO image id. Images without annotations are
    kept with no captions, so an ``image_info_test2014.json`` file (no annotations at all)
    reads as a test set. An annotation that names an unknown ``image_id`` is malformed.
    """
    source = Path(annotations_json)
    _check_split(split)
    return _read_coco(_load_json(source), source, Path(image_root), split, on_error, check_files)


def read_msrvtt(
    videodatainfo_json: str | Path,
    video_root: str | Path,
    *,
    on_error: OnError = "fail",
    check_files: bool = True,
) -> ReadResult:
    """Read MSR-VTT's ``videodatainfo.json`` (or ``test_videodatainfo.json``).

    A video's path is ``video_root / f"{video_id}.mp4"`` and its id is ``video_id``; the
    "validate" split becomes "val", and ``meta["category"]`` keeps the category when present.
    """
    source = Path(videodatainfo_json)
    return _read_msrvtt(_load_json(source), source, Path(video_root), on_error, check_files)


def load_dataset(
    spec: str | Path,
    *,
    root: str | Path | None = None,
    split: str | None = None,
    on_error: OnError = "fail",
    check_files: bool = True,
) -> ReadResult:
    """Read any supported dataset file, picking the reader from the file itself.

    A ``.jsonl`` file is a manifest. A JSON file is a Karpathy split file when its "images"
    entries have "sentences", a COCO captions file when it has "annotations" (or images with a
    "file_name"), and MSR-VTT when it has "videos" and "sentences". ``root`` is the image or
    video folder (default: the file's folder). With ``split``, only that split's items are kept
    and only their files are checked, so a partly downloaded dataset can still be read. A COCO
    file's items get ``split``, or the split its file name names ("captions_val2014.json").
    """
    source = Path(spec)
    if split is not None:
        _check_split(split)
    if source.suffix.lower() == ".jsonl":
        base = Path(root) if root is not None else source.parent
        return _read_manifest(source, base, on_error, check_files, keep_split=split)

    data = _load_json(source)
    media_root = Path(root) if root is not None else source.parent
    kind = _detect_format(data)
    if kind == "karpathy":
        return _read_karpathy(data, source, media_root, on_error, check_files, keep_split=split)
    if kind == "msrvtt":
        return _read_msrvtt(data, source, media_root, on_error, check_files, keep_split=split)
    if kind == "coco":
        coco_split = split if split is not None else _split_from_name(source)
        return _read_coco(data, source, media_root, coco_split, on_error, check_files)
    raise DatasetError(
        f"{source}: unknown dataset format: expected a Karpathy split file ('images' with "
        "'sentences'), a COCO captions file ('images' and 'annotations'), MSR-VTT's "
        "videodatainfo.json ('videos' and 'sentences'), or a .jsonl manifest"
    )


def _detect_format(data: Any) -> str | None:
    """Name the format of a parsed JSON dataset file: "karpathy", "coco", "msrvtt" or None."""
    if not isinstance(data, dict):
        return None
    if "videos" in data and "sentences" in data:
        return "msrvtt"
    images = data.get("images")
    if not isinstance(images, list):
        return None
    first = next((entry for entry in images if isinstance(entry, dict)), {})
    if "sentences" in first:
        return "karpathy"
    if "annotations" in data or "file_name" in first:
        return "coco"
    return None


class _Malformed(Exception):
    """One line or entry is wrong; the message says what, and the reader says where."""


class _Reader:
    """Collects one file's items, and applies ``on_error`` and ``check_files`` to each."""

    def __init__(
        self,
        source: Path,
        on_error: OnError,
        check_files: bool,
        keep_split: str | None = None,
    ) -> None:
        if on_error not in ("fail", "skip"):
            raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.source = source
        self.on_error = on_error
        self.check_files = check_files
        self.keep_split = keep_split
        self.items: list[CaptionItem] = []
        self.skipped: list[str] = []
        self.entries = 0
        self._ids: set[str] = set()

    def claim_id(self, item_id: str) -> None:
        """Reserve an item id, so that two items never share one."""
        if item_id in self._ids:
            raise _Malformed(f"duplicate id {item_id!r}; every item needs a unique id")
        self._ids.add(item_id)

    def add(self, item: CaptionItem) -> None:
        """Keep an item if it is in the wanted split and its files exist."""
        if self.keep_split is not None and item.split != self.keep_split:
            self.entries += 1
            return
        if self.check_files:
            missing = [path for path in item.paths if not path.exists()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise _Malformed(
                    f"file not found: {missing[0]}{more}; check the path and the root folder, "
                    "or pass check_files=False to leave files unchecked"
                )
        self.entries += 1
        self.items.append(item)

    def reject(self, where: str, problem: str) -> None:
        """Raise for a bad line or entry, or record it as skipped."""
        message = f"{self.source}: {where}: {problem}"
        if self.on_error == "fail":
            raise DatasetError(f"{message}. {_SKIP_HINT}")
        self.skipped.append(message)
        self.entries += 1

    def result(self, *, has_splits: bool = True) -> ReadResult:
        """Finish reading: warn once about what was skipped."""
        if self.skipped:
            logger.warning(
                "%s: skipped %d malformed or missing entries, kept %d items; first: %s",
                self.source,
                len(self.skipped),
                len(self.items),
                self.skipped[0],
            )
        return ReadResult(self.items, self.skipped, self.source, self.entries, has_splits)


def _read_manifest(
    source: Path,
    base: Path,
    on_error: OnError,
    check_files: bool,
    *,
    keep_split: str | None = None,
) -> ReadResult:
    reader = _Reader(source, on_error, check_files, keep_split)
    base = base.absolute()
    # Lines are gathered first, because a file listed twice is one item with both lines'
    # captions; the split filter and the file checks then apply to the merged item.
    found: dict[str, tuple[int, CaptionItem]] = {}
    try:
        with source.open("rb") as file:
            for lineno, raw in enumerate(file, start=1):
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    if not text.strip():
                        continue
                    entry = _parse_line(text)
                    item, explicit_id = _manifest_item(entry, lineno, base)
                    _place_manifest_item(found, item, explicit_id, lineno)
                except UnicodeDecodeError as error:
                    reader.reject(f"line {lineno}", f"not valid UTF-8 ({error.reason})")
                except _Malformed as error:
                    reader.reject(f"line {lineno}", str(error))
    except OSError as error:
        raise DatasetError(f"{source}: cannot read the manifest: {error.strerror}") from error
    for lineno, item in found.values():
        try:
            reader.add(item)
        except _Malformed as error:
            reader.reject(f"line {lineno}", str(error))
    return reader.result()


def _place_manifest_item(
    found: dict[str, tuple[int, CaptionItem]], item: CaptionItem, explicit_id: bool, lineno: int
) -> None:
    """Add a manifest line's item to ``found``, merging a file listed twice.

    An explicit id that is taken is an error. A derived id that is taken by the same media is
    the same item listed again: its captions are joined, in line order. A derived id taken by
    other media (``a/photo.jpg`` beside ``a/photo.png``) gets the line number as a suffix.
    """
    taken = found.get(item.id)
    if taken is None:
        found[item.id] = (lineno, item)
        return
    first_line, first = taken
    if explicit_id:
        raise _Malformed(
            f"duplicate id {item.id!r} (first on line {first_line}); every item needs a unique id"
        )
    if first.paths != item.paths:
        found[f"{item.id}#{lineno}"] = (lineno, replace(item, id=f"{item.id}#{lineno}"))
        return
    for name in ("split", "kind"):
        if getattr(first, name) != getattr(item, name):
            raise _Malformed(
                f"{_media_name(item)} is listed on line {first_line} with {name} "
                f"{getattr(first, name)!r} and here with {name} {getattr(item, name)!r}; "
                f"list it once, with one {name}"
            )
    merged = replace(first, captions=first.captions + item.captions, meta=first.meta | item.meta)
    found[item.id] = (first_line, merged)


def _media_name(item: CaptionItem) -> str:
    return str(item.paths[0]) + (
        f" (+{len(item.paths) - 1} frames)" if item.is_frame_sequence else ""
    )


def derived_id(paths: tuple[Path, ...], root: Path) -> str:
    """The id of media that has none: its path relative to ``root``, without the extension.

    A frame sequence whose frames share one folder is named by that folder; otherwise by its
    first frame. Paths outside ``root`` are used as they are. Unique whenever the paths are
    (up to the extension), unlike the file stem.
    """
    folders = {path.parent for path in paths}
    one_folder = len(paths) > 1 and len(folders) == 1
    named = folders.pop() if one_folder else paths[0].with_suffix("")
    # Outside the root, the path is used as it is.
    return (named.relative_to(root) if named.is_relative_to(root) else named).as_posix()


def _read_karpathy(
    data: Any,
    source: Path,
    root: Path,
    on_error: OnError,
    check_files: bool,
    *,
    keep_split: str | None = None,
) -> ReadResult:
    images = _top_level_list(data, "images", source, "a Karpathy split file")
    reader = _Reader(source, on_error, check_files, keep_split)
    _check_root(root, check_files, "image_root")
    root = root.absolute()
    for index, entry in enumerate(images):
        where = f"images[{index}]"
        try:
            entry = _object(entry, "the entry")
            filename = _string(_require(entry, "filename"), "'filename'")
            folder = _string(entry["filepath"], "'filepath'") if "filepath" in entry else ""
            item_id = _karpathy_id(entry, Path(folder, filename))
            where = f"{where} (id {item_id})"
            raw_split = _choice(_require(entry, "split"), "'split'", KARPATHY_SPLITS)
            sentences = _array(_require(entry, "sentences"), "'sentences'")
            captions = tuple(_karpathy_caption(s, n) for n, s in enumerate(sentences))
            reader.claim_id(item_id)
            reader.add(
                CaptionItem(
                    id=item_id,
                    paths=(root / folder / filename,),
                    kind="image",
                    captions=captions,
                    split=KARPATHY_SPLITS[raw_split],
                    meta={"karpathy_split": raw_split},
                )
            )
        except _Malformed as error:
            reader.reject(where, str(error))
    return reader.result()


def _karpathy_id(entry: dict[str, Any], relative: Path) -> str:
    for key in ("cocoid", "imgid"):
        if key in entry:
            return str(_integer(entry[key], f"'{key}'"))
    return relative.with_suffix("").as_posix()


def _karpathy_caption(sentence: Any, index: int) -> str:
    name = f"'sentences'[{index}]"
    sentence = _object(sentence, name)
    if "raw" not in sentence:
        raise _Malformed(f"{name} has no 'raw' text")
    return _caption(sentence["raw"], f"{name}['raw']")


def _read_coco(
    data: Any,
    source: Path,
    root: Path,
    split: str,
    on_error: OnError,
    check_files: bool,
) -> ReadResult:
    images = _top_level_list(data, "images", source, "a COCO captions file")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DatasetError(f"{source}: 'annotations' must be an array; is this a COCO file?")
    first = annotations[0] if annotations else {}
    if isinstance(first, dict) and "caption" not in first and "bbox" in first:
        raise DatasetError(
            f"{source}: this is a COCO instances file, not a captions file; "
            "use captions_<split>.json from the same annotations folder"
        )
    reader = _Reader(source, on_error, check_files)
    _check_root(root, check_files, "image_root")
    root = root.absolute()

    def image(image_id: int, entry: dict[str, Any]) -> CaptionItem:
        file_name = _string(_require(entry, "file_name"), "'file_name'")
        return CaptionItem(
            id=str(image_id), paths=(root / file_name,), kind="image", captions=(), split=split
        )

    _read_owners_then_captions(
        reader,
        images,
        image,
        annotations,
        names=("images", "annotations"),
        id_key="id",
        parse_id=_integer,
        label_key="id",
    )
    return reader.result(has_splits=False)


def _read_owners_then_captions(
    reader: _Reader,
    owners: list[Any],
    make_item: Callable[[Any, dict[str, Any]], CaptionItem],
    captions: list[Any],
    *,
    names: tuple[str, str],
    id_key: str,
    parse_id: Callable[[Any, str], Any],
    label_key: str,
) -> None:
    """Read the layout COCO and MSR-VTT share: a list of owners (images or videos) with ids,
    then a list of captions that each name their owner. Each owner becomes an item, made by
    ``make_item(id, entry)``, with its captions in order.

    ``names`` are the two lists' names (for messages); ``id_key`` is the owners' id field and
    ``label_key`` the caption records' own id. An owner whose entry is malformed is reported
    once and its captions are dropped silently; a caption of an unknown owner is malformed.
    """
    owners_name, captions_name = names
    noun = owners_name.removesuffix("s")
    owner_key = f"{noun}_id"  # how a caption names its owner: image_id, video_id
    found: dict[Any, tuple[str, CaptionItem]] = {}
    rejected: set[Any] = set()
    for index, entry in enumerate(owners):
        where = f"{owners_name}[{index}]"
        owner = None
        try:
            entry = _object(entry, "the entry")
            owner = parse_id(_require(entry, id_key), f"'{id_key}'")
            where = f"{where} ({id_key} {owner})"
            if owner in found:
                raise _Malformed(f"duplicate {noun} id {owner!r}; every {noun} needs a unique id")
            found[owner] = (where, make_item(owner, entry))
        except _Malformed as error:
            if owner is not None and owner not in found:
                rejected.add(owner)
            reader.reject(where, str(error))

    grouped: defaultdict[Any, list[str]] = defaultdict(list)
    for index, record in enumerate(captions):
        where = f"{captions_name}[{index}]"
        try:
            record = _object(record, f"the {captions_name.removesuffix('s')}")
            if label_key in record:
                where = f"{where} ({label_key} {record[label_key]})"
            owner = parse_id(_require(record, owner_key), f"'{owner_key}'")
            caption = _caption(_require(record, "caption"), "'caption'")
            if owner not in found:
                if owner in rejected:
                    continue  # its image or video was already reported
                raise _Malformed(f"'{owner_key}' {owner!r} is not in '{owners_name}'")
            grouped[owner].append(caption)
            reader.entries += 1
        except _Malformed as error:
            reader.reject(where, str(error))

    for owner, (where, item) in found.items():
        try:
            reader.add(replace(item, captions=tuple(grouped.get(owner, ()))))
        except _Malformed as error:
            reader.reject(where, str(error))


def _read_msrvtt(
    data: Any,
    source: Path,
    root: Path,
    on_error: OnError,
    check_files: bool,
    *,
    keep_split: str | None = None,
) -> ReadResult:
    videos = _top_level_list(data, "videos", source, "MSR-VTT's videodatainfo.json")
    sentences = _top_level_list(data, "sentences", source, "MSR-VTT's videodatainfo.json")
    reader = _Reader(source, on_error, check_files, keep_split)
    _check_root(root, check_files, "video_root")
    root = root.absolute()

    def video(video_id: str, entry: dict[str, Any]) -> CaptionItem:
        split = _choice(_require(entry, "split"), "'split'", MSRVTT_SPLITS)
        return CaptionItem(
            id=video_id,
            paths=(root / f"{video_id}{MSRVTT_VIDEO_SUFFIX}",),
            kind="video",
            captions=(),
            split=MSRVTT_SPLITS[split],
            meta={"category": entry["category"]} if "category" in entry else {},
        )

    _read_owners_then_captions(
        reader,
        videos,
        video,
        sentences,
        names=("videos", "sentences"),
        id_key="video_id",
        parse_id=_string,
        label_key="sen_id",
    )
    return reader.result()


def _manifest_item(entry: Any, lineno: int, base: Path) -> tuple[CaptionItem, bool]:
    """A manifest line's item, and whether its id was given (True) or derived (False)."""
    entry = _object(entry, "the line")
    if ("path" in entry) == ("paths" in entry):
        raise _Malformed("give exactly one of 'path' (one file) or 'paths' (a frame sequence)")
    if "path" in entry:
        names = [_string(entry["path"], "'path'")]
    else:
        frames = _array(entry["paths"], "'paths'")
        if not frames:
            raise _Malformed("'paths' is empty; list the frames in order")
        names = [_string(name, f"'paths'[{n}]") for n, name in enumerate(frames)]
    paths = tuple(base / name for name in names)
    captions = tuple(
        _caption(caption, f"'captions'[{n}]")
        for n, caption in enumerate(_array(_require(entry, "captions"), "'captions'"))
    )
    split = _choice(_require(entry, "split"), "'split'", SPLITS)
    if len(paths) > 1:
        default_kind = "video"
    else:
        default_kind = "video" if paths[0].suffix.lower() in VIDEO_EXTENSIONS else "image"
    kind = _choice(entry["kind"], "'kind'", KINDS) if "kind" in entry else default_kind
    if len(paths) > 1 and kind != "video":
        raise _Malformed("a frame sequence ('paths' with several frames) must have kind 'video'")
    explicit = "id" in entry
    item_id = _string(entry["id"], "'id'") if explicit else derived_id(paths, base)
    meta = _object(entry["meta"], "'meta'") if "meta" in entry else {}
    item = CaptionItem(
        id=item_id, paths=paths, kind=kind, captions=captions, split=split, meta=meta
    )
    return item, explicit


def _parse_line(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _Malformed(f"not valid JSON ({error.msg} at column {error.colno})") from None


def _load_json(source: Path) -> Any:
    try:
        with source.open("rb") as file:
            return json.load(file)
    except OSError as error:
        raise DatasetError(f"{source}: cannot read the dataset file: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{source}: not valid UTF-8 JSON: {error.reason}") from error
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from error


def _top_level_list(data: Any, key: str, source: Path, what: str) -> list[Any]:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise DatasetError(f"{source}: expected a top-level '{key}' array, as in {what}")
    return value


def _check_root(root: Path, check_files: bool, name: str) -> None:
    if check_files and not root.is_dir():
        raise DatasetError(
            f"{name} {root} is not a folder; pass the folder that holds the media files"
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _split_from_name(source: Path) -> str:
    named = [split for split in SPLITS if split in source.stem.lower()]
    if len(named) != 1:
        raise DatasetError(
            f"{source}: a COCO file carries no split and its name does not name one; "
            f"pass split= (one of {', '.join(SPLITS)})"
        )
    return named[0]


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _require(entry: dict[str, Any], key: str) -> Any:
    if key not in entry:
        raise _Malformed(f"missing field '{key}'")
    return entry[key]


def _checked(kind: type, article: str) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        # bool is an int in Python but not a number in JSON.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Malformed(f"{name} must be {article}, got {_json_type(value)}")
        return value

    return check


_object = _checked(dict, "an object")
_array = _checked(list, "an array")
_integer = _checked(int, "an integer")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else _json_type(value)
        raise _Malformed(f"{name} must be a non-empty string, got {got}")
    return value


def _caption(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{name} must be a caption string, got {_json_type(value)}")
    caption = value.strip()
    if not caption:
        raise _Malformed(f"{name} is an empty caption; remove it or write the caption")
    return caption


def _choice(value: Any, name: str, allowed: Collection[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _Malformed(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value
