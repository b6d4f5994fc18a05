"""`captioner batch` on the single-machine engine: inputs, rows, failures, shards, resuming."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioner.batch import local
from captioner.batch.inputs import Item, count_items, iter_items
from captioner.batch.local import ShardedOutput, run_local
from captioner.batch.rows import SCHEMA
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.inference import Captioner
from tests.conftest import make_video, png_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.load(tiny_checkpoint, device="cpu")


def colour(i: int) -> Image.Image:
    return Image.new("RGB", (40 + i, 30), (i * 37 % 256, i * 91 % 256, 128))


def make_library(folder: Path, images: int = 5) -> Path:
    """Images in a folder and a subfolder, a clip, a broken JPEG, files that are not media."""
    (folder / "sub").mkdir(parents=True)
    for i in range(images):
        colour(i).save(folder / ("sub" if i % 2 else "") / f"{i:02d}.png")
    make_video(folder / "clip.mp4", "libx264", num_frames=12)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not media")
    colour(9).save(folder / ".hidden.png")
    return folder


def make_tar(path: Path, count: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for name, data in ((f"s{i}.png", png_bytes(colour(20 + i))), (f"s{i}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def rows(output: Path) -> list[dict]:
    return pq.read_table(output).to_pylist()


def test_listings_stream_folders_globs_lists_tars_and_urls(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib")
    names = ["00.png", "sub/01.png", "sub/03.png"]
    (tmp_path / "list.jsonl").write_text(
        "".join(json.dumps({"path": f"lib/{n}"}) + "\n" for n in names)
    )
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path"])
        writer.writerows([[i, f"lib/{n}"] for i, n in enumerate(names)])
    (tmp_path / "list.txt").write_text("\n".join(str(lib / n) for n in names) + "\n")
    pq.write_table(pa.table({"path": [f"lib/{n}" for n in names]}), tmp_path / "list.parquet")
    make_tar(tmp_path / "shard.tar", 2)

    folder = [item.path for item in iter_items([str(lib)])]
    assert folder == [
        str(lib / n) for n in ("00.png", "02.png", "04.png", "broken.jpg", "clip.mp4")
    ] + [str(lib / "sub" / n) for n in ("01.png", "03.png")]
    expected = [str(lib / n) for n in names]
    for listing in ("list.jsonl", "list.csv", "list.txt", "list.parquet"):
        assert [item.path for item in iter_items([str(tmp_path / listing)])] == expected
    assert [i.path for i in iter_items([str(lib / "*.png")])] == [
        str(lib / n) for n in ("00.png", "02.png", "04.png")
    ]
    members = list(iter_items([str(tmp_path / "shard.tar")]))
    assert [m.path for m in members] == [f"{tmp_path / 'shard.tar'}#s{i}.png" for i in range(2)]
    assert members[0].data == png_bytes(colour(20))
    url = f"file://{lib}"
    assert [i.path for i in iter_items([url])] == [f"file://{p}" for p in folder]
    assert count_items([str(lib), str(tmp_path / "shard.tar")]) == 9


def test_a_list_without_paths_is_refused(tmp_path: Path) -> None:
    (tmp_path / "list.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(CaptionerError, match=r"list.jsonl:1: not a JSON object with a 'path'"):
        list(iter_items([str(tmp_path / "list.jsonl")]))


def test_batch_writes_one_row_per_input_with_the_servers_captions(
    tmp_path: Path, tiny_checkpoint: Path, captioner: Captioner, capsys
) -> None:
    lib = make_library(tmp_path / "lib")
    make_tar(tmp_path / "shard.tar", 2)
    (tmp_path / "list.txt").write_text("lib/00.png\nmissing.png\n")
    out = tmp_path / "out"
    code = main(
        [
            *("batch", str(lib), str(tmp_path / "shard.tar"), f"file://{tmp_path / 'list.txt'}"),
            *("-o", str(out), "--model", str(tiny_checkpoint), "--shard-size", "4"),
            *("--batch-size", "3", "--beam-size", "3", "--num-captions", "2", "--device", "cpu"),
        ]
    )
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert stdout.startswith("captioner batch: 9 done, 2 failed, 0 skipped") and "items/s" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "_captioner_job.json",
        "part-000000.parquet",
        "part-000001.parquet",
        "part-000002.parquet",
    ]
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(SCHEMA)
    got = {row["path"]: row for row in table.to_pylist()}
    assert list(got) == [
        item.path for item in iter_items([str(lib), str(tmp_path / "shard.tar")])
    ] + [
        f"file://{tmp_path / 'lib' / '00.png'}",
        f"file://{tmp_path / 'missing.png'}",
    ]
    # The captions are exactly what the Captioner gives the server for the same pixels.
    options = captioner.options(beam_size=3, num_captions=2)
    image = got[str(lib / "sub" / "03.png")]
    (expected,) = captioner.caption_images([lib / "sub" / "03.png"], options)
    assert image["captions"] == [vars(c) for c in expected.captions]
    assert image["caption"] == expected.caption and len(image["captions"]) == 2
    assert (image["kind"], image["width"], image["height"], image["frames"]) == ("image", 43, 30, 1)
    assert image["error_type"] is None and image["model"] == "tiny"
    clip = got[str(lib / "clip.mp4")]
    assert clip["caption"] == captioner.caption_video(lib / "clip.mp4", None, options).caption
    assert (clip["kind"], clip["frames"], clip["duration_s"]) == ("video", 8, pytest.approx(1.2))
    member = got[f"{tmp_path / 'shard.tar'}#s1.png"]
    assert member["caption"] == captioner.caption_images([colour(21)], options)[0].caption
    assert got[f"file://{lib / '00.png'}"]["captions"] == got[str(lib / "00.png")]["captions"]
    broken = got[str(lib / "broken.jpg")]
    assert broken["error_type"] == "InvalidMediaError" and broken["caption"] is None
    assert broken["error_message"] == f"{lib / 'broken.jpg'}: not a readable image"
    assert got[f"file://{tmp_path / 'missing.png'}"]["error_message"].endswith("no such file")
    assert broken["model"] == "tiny" and broken["captions"] is None


def test_resuming_skips_written_shards_and_checks_them(
    tmp_path: Path, captioner: Captioner
) -> None:
    lib = make_library(tmp_path / "lib", images=7)
    options = captioner.options()
    whole = run_local(captioner, [str(lib)], str(tmp_path / "whole"), options=options, shard_size=3)
    assert (whole.done, whole.failed, whole.skipped, len(whole.shards_written)) == (8, 1, 0, 3)

    out = tmp_path / "out"
    run_local(captioner, [str(lib)], str(out), options=options, shard_size=3)
    kept = out / "part-000000.parquet"
    stamp = kept.stat().st_mtime_ns
    (out / "part-000001.parquet").unlink()
    (out / ".part-000002.parquet.123.tmp").write_bytes(b"half a shard")  # a killed writer's
    again = run_local(captioner, [str(lib)], str(out), options=options, shard_size=3)
    assert again.shards_written == [str(out / "part-000001.parquet")]
    assert (again.done + again.failed, again.skipped) == (3, 6)
    assert kept.stat().st_mtime_ns == stamp
    assert rows(out) == rows(tmp_path / "whole")
    assert not list(out.glob(".*"))

    with pytest.raises(CaptionerError, match=r"different job \(options differ"):
        run_local(
            captioner, [str(lib)], str(out), options=captioner.options(beam_size=2), shard_size=3
        )
    (lib / "000.png").write_bytes(png_bytes(colour(3)))  # sorts first: every shard shifts
    with pytest.raises(CaptionerError, match="the inputs changed"):
        run_local(captioner, [str(lib)], str(out), options=options, shard_size=3)
    redo = run_local(captioner, [str(lib)], str(out), options=options, shard_size=3, overwrite=True)
    assert (redo.done + redo.failed, redo.skipped) == (10, 0)


def test_memory_is_bounded_the_listing_is_pulled_one_shard_at_a_time(
    tmp_path: Path, captioner: Captioner, monkeypatch
) -> None:
    image = png_bytes(colour(1))
    pulled = 0

    def endless_listing(n: int):
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield Item(f"item{i:04d}.png", image)

    seen: list[tuple[int, int]] = []
    write = ShardedOutput.write

    def recording_write(self, index, shard_rows):
        seen.append((index, pulled))
        return write(self, index, shard_rows)

    monkeypatch.setattr(ShardedOutput, "write", recording_write)
    summary = run_local(
        captioner,
        endless_listing(50),
        str(tmp_path / "out"),
        options=captioner.options(),
        shard_size=8,
        batch_size=4,
        job={"inputs": "generated"},
    )
    # When shard i is written, the listing has been read exactly up to its end, not beyond.
    assert seen == [(i, min(8 * (i + 1), 50)) for i in range(7)]
    assert (
        summary.done == 50
        and pq.read_metadata(tmp_path / "out" / "part-000006.parquet").num_rows == 2
    )


@pytest.mark.slow  # two processes that each load a model
def test_a_killed_run_resumes_without_redoing_finished_shards(
    tmp_path: Path, tiny_checkpoint: Path, captioner: Captioner
) -> None:
    """A real process, killed (SIGKILL) mid-job: its input is a FIFO fed a few paths at a time,
    so it is certain to be killed with shards written and inputs left."""
    lib = tmp_path / "lib"
    lib.mkdir()
    lines = []
    for i in range(10):
        colour(i).save(lib / f"{i}.png")
        lines.append(json.dumps({"path": str(lib / f"{i}.png")}) + "\n")
    (tmp_path / "all.jsonl").write_text("".join(lines))
    run_local(captioner, [str(tmp_path / "all.jsonl")], str(tmp_path / "whole"),
              options=captioner.options(), shard_size=2)  # fmt: skip

    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "captioner.cli", "batch", str(fifo), "-o", str(out)]
    command += ["--model", str(tiny_checkpoint), "--shard-size", "2", "--no-count"]
    command += ["--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(fifo, "w") as feed:
        feed.writelines(lines[:5])  # two shards and one input of the third
        feed.flush()
        shards = [out / "part-000000.parquet", out / "part-000001.parquet"]
        deadline = time.monotonic() + 60
        while not all(s.exists() for s in shards) and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1].decode()
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("part-*")) == [s.name for s in shards]
    written = [s.stat().st_mtime_ns for s in shards]

    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(fifo, "w") as feed:
        feed.writelines(lines)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr.decode()
    assert stdout.decode().startswith("captioner batch: 6 done, 0 failed, 4 skipped")
    assert [s.stat().st_mtime_ns for s in shards] == written
    assert rows(out) == rows(tmp_path / "whole")


def test_progress_bar_counts_the_inputs_for_its_eta(tmp_path: Path, captioner, monkeypatch) -> None:
    lib = make_library(tmp_path / "lib")
    bars = []
    real = local.progress_bar

    def keep(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(local, "progress_bar", keep)
    run_local(captioner, [str(lib)], str(tmp_path / "out"), options=captioner.options())
    (bar,) = bars
    assert (bar.n, bar.total, bar.unit) == (7, 7, "item")


def test_output_may_be_an_fsspec_url(tmp_path: Path, captioner: Captioner) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(3):
        colour(i).save(lib / f"{i}.png")
    summary = run_local(
        captioner, [str(lib)], f"file://{tmp_path / 'out'}", options=captioner.options()
    )
    assert summary.shards_written == [str(tmp_path / "out" / "part-000000.parquet")]
    assert [row["path"] for row in rows(tmp_path / "out")] == [
        str(lib / f"{i}.png") for i in range(3)
    ]
