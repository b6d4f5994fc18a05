"""What a batch job captions: inputs named by folders, globs, lists of paths or tar shards.

Listings stream: a folder is walked one directory at a time, a list is read line by line (a
Parquet list one row group at a time), and a tar shard member by member, so memory does not
grow with the number of inputs. Local paths and fsspec URLs (``s3://``, ``gs://``,
``file://``, ... where the filesystem's package is installed) work alike.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from captioner.errors import CaptionerError, InvalidMediaError
from captioner.media_types import IMAGE_SUFFIXES, VIDEO_SUFFIXES

MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES
LIST_SUFFIXES = frozenset({".jsonl", ".csv", ".parquet", ".txt"})  # one input path per row
TAR_SUFFIXES = frozenset({".tar"})  # WebDataset shards: every media member is an input
MEMBER_SEPARATOR = "#"  # shard.tar#member.jpg names a member of a tar shard
PATH_COLUMN = "path"  # the column (or JSON key) of a list that holds the paths


@dataclass(frozen=True)
class Item:
    """One input: its name in the output, and its bytes when they came with the listing."""

    path: str  # a local path, a URL, or ``shard.tar#member``
    data: bytes | None = None  # set for tar members; other inputs are read when decoded


def is_url(spec: str) -> bool:
    return "://" in spec


def filesystem(spec: str) -> tuple[Any, str]:
    """The fsspec filesystem of a path or URL, and the path within it (local: absolute)."""
    import fsspec

    if not is_url(spec):
        return fsspec.filesystem("file"), os.path.abspath(spec)
    return fsspec.core.url_to_fs(spec)


def shown_path(fs: Any, path: str, url: bool) -> str:
    """How a file is named in the output: a plain path for local inputs given as paths, else a
    URL with its protocol, so that the name opens the same file again."""
    return fs.unstrip_protocol(path) if url else path


def suffix(path: str) -> str:
    return PurePosixPath(path.rsplit(MEMBER_SEPARATOR, 1)[-1]).suffix.lower()


def iter_items(specs: Sequence[str], *, with_data: bool = True) -> Iterator[Item]:
    """Every input the ``specs`` name, in a stable order (sorted within a folder or glob).

    A spec is a media file, a folder (walked for media files, hidden names skipped), a glob,
    a list of paths (``.jsonl`` objects with a "path" key, ``.csv`` or ``.parquet`` with a
    "path" column, ``.txt`` one path a line) or a ``.tar`` shard. Relative paths in a list
    are relative to the list's folder. ``with_data=False`` leaves tar members' bytes unread
    (for counting).
    """
    for spec in specs:
        fs, root = filesystem(spec)
        url = is_url(spec)
        if is_glob(root):
            for path in glob(fs, root):
                if fs.isdir(path):
                    yield from _walk(fs, path, url)
                else:
                    yield from _expand(fs, path, url, with_data)
        elif fs.isdir(root):
            yield from _walk(fs, root, url)
        else:
            yield from _expand(fs, root, url, with_data)


def is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def glob(fs: Any, pattern: str) -> list[str]:
    """A glob's matches, sorted; hidden names are left out, as a shell's glob does."""
    return sorted(p for p in fs.glob(pattern) if not _hidden(p))


def _hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith(".")


def count_items(specs: Sequence[str]) -> int:
    """How many inputs ``iter_items`` yields (reads listings again; tar members stay unread)."""
    return sum(1 for _ in iter_items(specs, with_data=False))


def _walk(fs: Any, folder: str, url: bool) -> Iterator[Item]:
    """A folder's media files, depth first in name order; one directory's names in memory at a
    time (about 100 MB for a million files in one directory: sorting needs them all)."""
    for name, is_dir in _entries_of(fs, folder):
        if _hidden(name):
            continue
        if is_dir:
            yield from _walk(fs, name, url)
        elif suffix(name) in MEDIA_SUFFIXES:
            yield Item(shown_path(fs, name, url))


def _entries_of(fs: Any, folder: str) -> list[tuple[str, bool]]:
    """A directory's entries (full name, is a directory), sorted by name."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):  # os.scandir: names only, no per-file detail dicts
        with os.scandir(folder) as scan:
            return sorted((entry.path, entry.is_dir()) for entry in scan)
    entries = fs.ls(folder, detail=True)
    return sorted((entry["name"], entry["type"] == "directory") for entry in entries)


def _expand(fs: Any, path: str, url: bool, with_data: bool) -> Iterator[Item]:
    kind = suffix(path)
    shown = shown_path(fs, path, url)
    if kind in TAR_SUFFIXES:
        yield from _tar_members(fs, path, shown, with_data)
    elif kind in LIST_SUFFIXES:
        for entry in _list_entries(fs, path, kind):
            yield Item(resolve_entry(shown, entry))
    else:
        yield Item(shown)  # a file named on its own is an input, whatever its suffix


def resolve_entry(list_path: str, entry: str) -> str:
    """A list's entry as a path or URL: relative entries are relative to the list's folder."""
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(list_path):
        return posixpath.join(posixpath.dirname(list_path), entry)
    return os.path.normpath(os.path.join(os.path.dirname(list_path), entry))


def _open(fs: Any, path: str, mode: str, **options: Any) -> Any:
    """A file of ``fs`` open for reading; local files by the OS alone, since fsspec's local
    files seek, which a pipe (a list streamed in through a FIFO) cannot."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return open(path, mode, **options)  # the caller closes it
    return fs.open(path, mode, **options)


def _list_entries(fs: Any, path: str, kind: str) -> Iterator[str]:
    if kind == ".parquet":
        import pyarrow.parquet as pq

        with _open(fs, path, "rb") as handle:
            reader = pq.ParquetFile(handle)
            if PATH_COLUMN not in reader.schema_arrow.names:
                raise CaptionerError(f"{path}: the list has no {PATH_COLUMN!r} column")
            for batch in reader.iter_batches(columns=[PATH_COLUMN], batch_size=4096):
                yield from (str(value) for value in batch.column(0).to_pylist())
        return
    with _open(fs, path, "rt", encoding="utf-8", newline="") as handle:
        if kind == ".csv":
            reader = csv.DictReader(handle)
            if PATH_COLUMN not in (reader.fieldnames or []):
                raise CaptionerError(f"{path}: the list has no {PATH_COLUMN!r} column")
            yield from (row[PATH_COLUMN] for row in reader)
            return
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if kind == ".txt":
                yield line
                continue
            yield path_of_json(f"{path}:{number}", line)


def path_of_json(where: str, line: str) -> str:
    """The path in one line of a JSONL list."""
    try:
        return str(json.loads(line)[PATH_COLUMN])
    except (ValueError, TypeError, KeyError) as exc:
        raise CaptionerError(f"{where}: not a JSON object with a {PATH_COLUMN!r} key") from exc


def _tar_members(fs: Any, path: str, shown: str, with_data: bool) -> Iterator[Item]:
    with _open(fs, path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:  # streaming mode: one member at a time, never the whole index
            if not member.isfile() or suffix(member.name) not in MEDIA_SUFFIXES:
                continue
            data = None
            if with_data:
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            yield Item(f"{shown}{MEMBER_SEPARATOR}{member.name}", data)


def read_source(item: Item) -> bytes | Path:
    """What the media decoders open for an item: its bytes, or a local file's path."""
    if item.data is not None:
        return item.data
    if not is_url(item.path):
        return Path(item.path)
    import fsspec

    try:
        with fsspec.open(item.path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise InvalidMediaError(f"{item.path}: no such file") from exc
