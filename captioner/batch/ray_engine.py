"""The batch job on Ray Data (``captioner batch --engine ray``; needs ``captioner[ray]``).

Ray's readers list and read the inputs (``read_binary_files`` for folders, globs and files,
``read_webdataset`` for tar shards, ``read_json``/``read_csv``/``read_parquet``/``read_text``
for lists of paths); CPU tasks decode them with the same ``MediaPreparer`` as the server;
an actor pool, one model per actor (a GPU each with ``num_gpus``), captions them in batches
with ``Captioner.caption_tensors``; Ray writes the Parquet files. The rows are the
single-machine engine's (``rows.py``), in no particular order.

Ray retries failed tasks and restarts dead actors, but a run stopped from outside starts
again from the beginning: resuming by shard is the single-machine engine's.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from captioner.batch.inputs import (
    LIST_SUFFIXES,
    MEDIA_SUFFIXES,
    MEMBER_SEPARATOR,
    PATH_COLUMN,
    TAR_SUFFIXES,
    Item,
    filesystem,
    glob,
    is_glob,
    is_url,
    path_of_json,
    resolve_entry,
    shown_path,
    suffix,
)
from captioner.batch.local import Summary
from captioner.batch.rows import COLUMNS, Prepared, caption_rows, prepare_or_fail, stamp, to_table
from captioner.errors import CaptionerError

if TYPE_CHECKING:
    from captioner.config import DecodingOptions
    from captioner.media import MediaPreparer

log = logging.getLogger(__name__)

LISTED = pa.schema([("path", pa.string()), ("data", pa.binary())])  # data: null = read it later
DECODED = pa.schema(
    [
        ("path", pa.string()),
        ("kind", pa.string()),
        ("pixels", pa.large_binary()),  # the (T, 3, S, S) float32 tensor's bytes
        ("frames", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("duration_s", pa.float64()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
    ]
)
EXTENSIONS = sorted(s.lstrip(".") for s in MEDIA_SUFFIXES)


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise CaptionerError(
            "--engine ray needs Ray: pip install 'captioner[ray]' (or run without --engine ray)"
        ) from exc
    return ray


def connect(address: str | None = None, **init_options: Any) -> None:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local Ray."""
    ray = require_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        init_options.setdefault("include_dashboard", False)
    ray.init(address=address, **init_options)


def run_ray(
    specs: list[str],
    output: str,
    *,
    model: str | Path | None,
    options: DecodingOptions,
    num_frames: int | None = None,
    batch_size: int = 16,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    device: str = "auto",
    address: str | None = None,
    overwrite: bool = False,
) -> Summary:
    """Caption every input the ``specs`` name into Parquet files under ``output``, on Ray."""
    ray = require_ray()
    from captioner.checkpoint import load_configs
    from captioner.inference import DEFAULT_MODEL_DIR
    from captioner.media import MediaPreparer

    _empty_output(output, overwrite)
    model = Path(model) if model is not None else DEFAULT_MODEL_DIR
    preprocess, _ = load_configs(model)
    started = time.perf_counter()
    connect(address)
    resources = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if actors is None:
        gpus = int(resources.get("GPU", 0) // gpus_per_actor) if gpus_per_actor else 0
        actors = max(1, gpus or int(resources.get("CPU", 1)) // 4)
    listed = _read(ray, specs)
    decoded = listed.map_batches(
        partial(_decode_batch, MediaPreparer(preprocess), num_frames),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=1,
    )
    captioned = decoded.map_batches(
        CaptionActor,
        fn_constructor_kwargs={
            "model": str(model),
            "options": options,
            "image_size": preprocess.image_size,
            "device": device,
            "threads": 1 if not gpus_per_actor else None,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=actors,
        num_cpus=1 if not gpus_per_actor else 0,
        num_gpus=gpus_per_actor,
    )
    fs, root = filesystem(output)  # a local path is made absolute: Ray's workers have no cwd
    arrow_fs = _arrow_filesystem(fs)
    captioned.write_parquet(root, filesystem=arrow_fs)
    summary = Summary(seconds=time.perf_counter() - started)
    errors = pq.read_table(root, filesystem=arrow_fs, columns=["error_type"])[0]
    summary.failed = len(errors) - errors.null_count
    summary.done = errors.null_count
    return summary


def _empty_output(output: str, overwrite: bool) -> None:
    fs, root = filesystem(output)
    if fs.exists(root) and fs.ls(root, detail=False):
        if not overwrite:
            raise CaptionerError(
                f"{output} is not empty; the Ray engine does not resume: pass --overwrite "
                "or a new --output"
            )
        fs.rm(root, recursive=True)


def _read(ray: Any, specs: list[str]) -> Any:
    """One dataset of (path, data) rows over every spec, read by Ray's readers."""
    datasets = []
    for spec in specs:
        fs, root = filesystem(spec)
        url = is_url(spec)
        paths = glob(fs, root) if is_glob(root) else [root]
        arrow_fs = _arrow_filesystem(fs)
        for path in paths:
            kind = "folder" if fs.isdir(path) else suffix(path)
            shown = partial(shown_path, fs, url=url)
            if kind == "folder":
                ds = ray.data.read_binary_files(
                    path, include_paths=True, file_extensions=EXTENSIONS, filesystem=arrow_fs
                )
                datasets.append(ds.map_batches(partial(_files, shown), batch_format="pyarrow"))
            elif kind in TAR_SUFFIXES:
                ds = ray.data.read_webdataset(
                    path, decoder=None, include_paths=True, filesystem=arrow_fs
                )
                datasets.append(ds.map_batches(partial(_members, shown), batch_format="pyarrow"))
            elif kind in LIST_SUFFIXES:
                datasets.append(_read_list(ray, path, shown(path), kind, arrow_fs))
            else:
                datasets.append(ray.data.from_arrow(_listed([Item(shown(path))])))
    if not datasets:
        raise CaptionerError("no inputs given")
    first, *rest = datasets
    return first.union(*rest) if rest else first


def _arrow_filesystem(fs: Any) -> Any:
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def _read_list(ray: Any, path: str, shown: str, kind: str, filesystem: Any) -> Any:
    if kind == ".parquet":
        ds = ray.data.read_parquet(path, columns=[PATH_COLUMN], filesystem=filesystem)
    elif kind == ".csv":
        ds = ray.data.read_csv(path, filesystem=filesystem)
    else:  # .jsonl, .txt: Ray's read_json(lines=True) takes no filesystem, so lines are parsed
        ds = ray.data.read_text(path, filesystem=filesystem)
    return ds.map_batches(partial(_entries, shown, kind), batch_format="pyarrow")


def _listed(items: list[Item]) -> pa.Table:
    return pa.Table.from_pylist([{"path": i.path, "data": i.data} for i in items], schema=LISTED)


def _files(shown: Any, batch: pa.Table) -> pa.Table:
    paths = [shown(p) for p in batch.column("path").to_pylist()]
    return pa.Table.from_arrays([pa.array(paths), batch.column("bytes")], schema=LISTED)


def _members(shown: Any, batch: pa.Table) -> pa.Table:
    """A WebDataset sample per row (one column per file extension): one item per media file."""
    items = []
    media = [name for name in batch.column_names if f".{name}".lower() in MEDIA_SUFFIXES]
    for row in batch.select(["__key__", "path", *media]).to_pylist():
        for extension in media:
            if row[extension] is not None:
                member = f"{shown(row['path'])}{MEMBER_SEPARATOR}{row['__key__']}.{extension}"
                items.append(Item(member, row[extension]))
    return _listed(items)


def _entries(shown_list: str, kind: str, batch: pa.Table) -> pa.Table:
    if kind in (".jsonl", ".txt"):
        entries = [line for line in map(str.strip, batch.column("text").to_pylist()) if line]
        if kind == ".jsonl":
            entries = [path_of_json(shown_list, line) for line in entries]
    elif PATH_COLUMN in batch.column_names:
        entries = [str(e) for e in batch.column(PATH_COLUMN).to_pylist()]
    else:
        raise CaptionerError(f"{shown_list}: the list has no {PATH_COLUMN!r} column")
    return _listed([Item(resolve_entry(shown_list, e)) for e in entries])


def _decode_batch(media: MediaPreparer, num_frames: int | None, batch: pa.Table) -> pa.Table:
    """The CPU task: each listed input decoded to pixels, or its failure."""
    rows = []
    listed = zip(batch.column("path").to_pylist(), batch.column("data").to_pylist(), strict=True)
    for path, data in listed:
        value = prepare_or_fail(media, Item(path, data), num_frames)
        if isinstance(value, Prepared):
            tensor = value.tensor.numpy()
            rows.append(
                {
                    "path": value.path,
                    "kind": value.kind,
                    "pixels": tensor.tobytes(),
                    "frames": len(tensor),
                    "width": value.width,
                    "height": value.height,
                    "duration_s": value.duration_s,
                }
            )
        else:
            rows.append({k: value[k] for k in ("path", "kind", "error_type", "error_message")})
    return pa.Table.from_pylist(rows, schema=DECODED)


class CaptionActor:
    """One model per actor: captions decoded inputs in batches (``map_batches``)."""

    def __init__(
        self,
        model: str,
        options: DecodingOptions,
        image_size: int,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        import torch

        from captioner.inference import Captioner

        self.torch = torch
        self.captioner = Captioner.load(model, device=device, num_threads=threads)
        self.options = self.captioner.options(options)
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any] | None] = []
        waiting: list[tuple[int, Prepared]] = []
        size = self.image_size
        for row in batch.to_pylist():
            if row["error_type"] is not None:
                failed = dict.fromkeys(COLUMNS)
                failed.update({k: row[k] for k in ("path", "kind", "error_type", "error_message")})
                rows.append(failed)
                continue
            pixels = np.frombuffer(row["pixels"], dtype=np.float32)
            tensor = self.torch.from_numpy(pixels.reshape(row["frames"], 3, size, size).copy())
            waiting.append(
                (
                    len(rows),
                    Prepared(
                        row["path"],
                        row["kind"],
                        tensor,
                        row["width"],
                        row["height"],
                        row["duration_s"],
                    ),
                )
            )
            rows.append(None)
        if waiting:
            done = caption_rows(self.captioner, [p for _, p in waiting], self.options)
            for (position, _), captioned in zip(waiting, done, strict=True):
                rows[position] = captioned
        return to_table(stamp([row for row in rows if row is not None], self.captioner))
