"""The single-machine batch engine: decode in a thread pool, caption in batches, write shards.

The input listing is cut into shards of ``shard_size`` inputs, in listing order; shard ``i``
becomes ``part-0000i.parquet``, written whole to a temporary name and renamed, so a shard file
is either complete or absent. A run that stops (killed, out of power) is resumed by running
the same command again: the shards already written are skipped, after checking that they hold
the inputs the listing names there now.

Memory is bounded by the decode window and one shard's rows, whatever the number of inputs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count, islice
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow.parquet as pq

from captioner.batch.inputs import Item, count_items, is_url, iter_items
from captioner.batch.rows import Prepared, caption_rows, prepare_or_fail, stamp, to_table
from captioner.errors import CaptionerError
from captioner.progress import progress_bar

if TYPE_CHECKING:
    from captioner.config import DecodingOptions
    from captioner.inference import Captioner

log = logging.getLogger(__name__)

JOB_FILE = "_captioner_job.json"  # what the job was; a resumed run must be the same job
JOB_FORMAT = "captioner-batch-job"
SHARD_NAME = "part-{index:06d}.parquet"
FIRST_KEY, LAST_KEY = b"captioner.first_path", b"captioner.last_path"

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Summary:
    """What a run did: inputs captioned, failed, and skipped (written by an earlier run)."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    shards_written: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Inputs processed (captioned or failed) per second of this run."""
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done} done, {self.failed} failed, {self.skipped} skipped "
            f"(already written) in {self.seconds:.1f} s: {self.rate:.1f} items/s"
        )


class ShardedOutput:
    """A folder (local or fsspec URL) of Parquet shards plus the job description."""

    def __init__(self, url: str, job: dict[str, Any], *, overwrite: bool = False) -> None:
        import fsspec

        self.fs, self.root = (
            fsspec.core.url_to_fs(url) if is_url(url) else (fsspec.filesystem("file"), url)
        )
        self.fs.makedirs(self.root, exist_ok=True)
        for path in self.fs.ls(self.root, detail=False):  # a killed run's half-written shard
            if path.rstrip("/").rsplit("/", 1)[-1].startswith(".part-"):
                self.fs.rm(path)
        job_path = self._path(JOB_FILE)
        existing = self._shards()
        if overwrite:
            for path in existing.values():
                self.fs.rm(path)
            existing = {}
        elif self.fs.exists(job_path):
            with self.fs.open(job_path, "rt") as handle:
                previous = json.load(handle)
            keys = job.keys() | previous.keys()
            changed = sorted(k for k in keys if job.get(k) != previous.get(k))
            if changed:
                raise CaptionerError(
                    f"{url} holds the output of a different job ({', '.join(changed)} differ); "
                    "run the same command to resume it, or pass --overwrite or a new --output"
                )
        elif existing:
            raise CaptionerError(
                f"{url} holds Parquet shards but no {JOB_FILE}: not a captioner batch output; "
                "pass --overwrite or a new --output"
            )
        with self.fs.open(job_path, "wt") as handle:
            json.dump(job, handle, indent=1)
        self.done = existing  # shard index -> path

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _shards(self) -> dict[int, str]:
        shards = {}
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".parquet"):
                shards[int(name[5:-8])] = path
        return shards

    def check(self, index: int, first: str | None, last: str | None, rows: int) -> None:
        """Fail when shard ``index`` does not hold the inputs the listing names there now."""
        with self.fs.open(self.done[index], "rb") as handle:
            meta = pq.read_metadata(handle)
        kv = meta.metadata or {}
        written = (kv.get(FIRST_KEY, b"").decode(), kv.get(LAST_KEY, b"").decode(), meta.num_rows)
        if written != (first or "", last or "", rows):
            raise CaptionerError(
                f"{self.done[index]} holds inputs {written[0]!r} to {written[1]!r} "
                f"({written[2]} rows) but the listing now has {first!r} to {last!r} ({rows}): "
                "the inputs changed since it was written; pass --overwrite or a new --output"
            )

    def write(self, index: int, rows: list[dict[str, Any]]) -> str:
        """Write one shard atomically: a temporary file, then a rename."""
        table = to_table(rows)
        meta = {FIRST_KEY: rows[0]["path"].encode(), LAST_KEY: rows[-1]["path"].encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        final = self._path(SHARD_NAME.format(index=index))
        temporary = self._path(f".{SHARD_NAME.format(index=index)}.{os.getpid()}.tmp")
        with self.fs.open(temporary, "wb") as handle:
            pq.write_table(table, handle)
        self.fs.mv(temporary, final)
        return final


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int
) -> Iterator[R]:
    """``map(fn, items)`` in the pool, in order, with at most ``window`` items in flight."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def run_local(
    captioner: Captioner,
    inputs: Sequence[str] | Iterable[Item],
    output: str,
    *,
    options: DecodingOptions,
    num_frames: int | None = None,
    shard_size: int = 1000,
    batch_size: int = 16,
    workers: int | None = None,
    overwrite: bool = False,
    count_first: bool = True,
    job: dict[str, Any] | None = None,
) -> Summary:
    """Caption every input into Parquet shards under ``output``; see the module's docstring.

    ``inputs`` are specs for ``iter_items`` (folders, globs, lists, tar shards), or any
    iterable of ``Item`` (then ``job`` should describe it, for resuming).
    """
    if shard_size < 1 or batch_size < 1:
        raise CaptionerError("--shard-size and --batch-size must be at least 1")
    specs = [str(spec) for spec in inputs] if _are_specs(inputs) else None
    description = {
        "format": JOB_FORMAT,
        "inputs": specs,
        "shard_size": shard_size,
        "options": vars(options),
        "num_frames": num_frames,
        "model": captioner.name,
        "model_version": captioner.version,
        **(job or {}),
    }
    out = ShardedOutput(output, description, overwrite=overwrite)
    listing: Iterator[Item] = iter_items(specs) if specs is not None else iter(inputs)  # type: ignore[arg-type]
    workers = workers or _available_cpus()
    summary = Summary()
    started = time.perf_counter()
    bar = progress_bar(total=None, unit="item", desc="captioning", dynamic_ncols=True)
    counter = threading.Thread(target=_set_total, args=(bar, specs), daemon=True)
    if specs is not None and count_first:
        # Counted beside the work, for the bar's ETA: a long listing does not delay the start.
        counter.start()

    def prepare(item: Item) -> Prepared | dict[str, Any]:
        return prepare_or_fail(captioner.media, item, num_frames)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            for index in count():
                chunk = islice(listing, shard_size)
                if index in out.done:
                    first, last, rows = _span(chunk)
                    out.check(index, first, last, rows)
                    summary.skipped += rows
                    bar.update(rows)
                    continue
                rows_out = _caption_shard(
                    captioner,
                    ordered_map(pool, prepare, chunk, window=max(2 * batch_size, 4 * workers)),
                    options,
                    batch_size,
                    summary,
                    bar,
                )
                if not rows_out:
                    break
                summary.shards_written.append(out.write(index, stamp(rows_out, captioner)))
    finally:
        if counter.is_alive():
            counter.join(timeout=1.0)  # the final bar shows the total when it is known by now
        bar.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _caption_shard(
    captioner: Captioner,
    prepared: Iterator[Prepared | dict[str, Any]],
    options: DecodingOptions,
    batch_size: int,
    summary: Summary,
    bar: Any,
) -> list[dict[str, Any]]:
    """One shard's rows in listing order: decoded inputs captioned ``batch_size`` at a time."""
    rows: list[dict[str, Any] | None] = []
    waiting: list[tuple[int, Prepared]] = []

    def flush() -> None:
        done = caption_rows(captioner, [p for _, p in waiting], options)
        for (position, _), row in zip(waiting, done, strict=True):
            rows[position] = row
            _count(summary, row)
        bar.update(len(waiting))
        waiting.clear()

    for value in prepared:
        if isinstance(value, Prepared):
            waiting.append((len(rows), value))
            rows.append(None)
            if len(waiting) >= batch_size:
                flush()
        else:
            rows.append(value)
            _count(summary, value)
            bar.update(1)
    if waiting:
        flush()
    return [row for row in rows if row is not None]


def _count(summary: Summary, row: dict[str, Any]) -> None:
    if row["error_type"] is None:
        summary.done += 1
    else:
        summary.failed += 1


def _span(chunk: Iterable[Item]) -> tuple[str | None, str | None, int]:
    """First and last path of a chunk and its length, reading it without decoding anything."""
    first = last = None
    rows = 0
    for item in chunk:
        first = first or item.path
        last = item.path
        rows += 1
    return first, last, rows


def _set_total(bar: Any, specs: list[str]) -> None:
    try:
        bar.total = count_items(specs)
        bar.refresh()
    except Exception:  # the count is only for the ETA; the job reports listing errors itself
        log.debug("could not count the inputs", exc_info=True)


def _are_specs(inputs: Any) -> bool:
    return isinstance(inputs, list | tuple) and all(not isinstance(i, Item) for i in inputs)


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
