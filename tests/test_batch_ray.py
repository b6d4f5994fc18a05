"""`captioner batch --engine ray` on a local 2-CPU Ray: the same rows as the local engine."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioner.batch.local import run_local
from captioner.batch.ray_engine import run_ray
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.inference import Captioner
from tests.conftest import make_video
from tests.test_batch import make_library, make_tar

ray = pytest.importorskip("ray", reason="the Ray engine needs Ray: pip install 'captioner[ray]'")

pytestmark = pytest.mark.slow  # starts Ray (about 10 s) and a model actor


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def by_path(output: Path) -> list[dict]:
    return sorted(pq.read_table(output).to_pylist(), key=lambda row: row["path"])


def test_the_ray_engine_writes_the_local_engines_rows(
    tmp_path: Path, tiny_checkpoint: Path, local_ray, capsys
) -> None:
    lib = make_library(tmp_path / "lib", images=9)
    make_video(lib / "sub" / "wave.gif", "gif", num_frames=6)
    make_tar(tmp_path / "shard.tar", 3)
    (tmp_path / "list.jsonl").write_text('{"path": "lib/00.png"}\n{"path": "gone.png"}\n')
    inputs = [str(lib), str(tmp_path / "shard.tar"), f"file://{tmp_path / 'list.jsonl'}"]
    options = ["--beam-size", "2", "--num-captions", "2", "--batch-size", "4", "--device", "cpu"]
    captioner = Captioner.load(tiny_checkpoint, device="cpu")
    run_local(
        captioner,
        inputs,
        str(tmp_path / "local"),
        options=captioner.options(beam_size=2, num_captions=2),
        batch_size=4,
        shard_size=5,
    )
    code = main(
        [
            *("batch", *inputs, "-o", str(tmp_path / "ray"), "--engine", "ray"),
            *("--model", str(tiny_checkpoint), *options),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.startswith("captioner batch: 15 done, 2 failed, 0 skipped")
    expected, got = by_path(tmp_path / "local"), by_path(tmp_path / "ray")
    assert len(got) == len(expected) == 17
    for ray_row, local_row in zip(got, expected, strict=True):
        assert ray_row == local_row
    kinds = {row["kind"] for row in got if row["error_type"] is None}
    assert kinds == {"image", "video"} and sum(row["error_type"] is not None for row in got) == 2
    assert pq.read_table(tmp_path / "ray").schema.equals(pq.read_table(tmp_path / "local").schema)

    with pytest.raises(CaptionerError, match="does not resume"):
        run_ray(inputs, str(tmp_path / "ray"), model=tiny_checkpoint, options=captioner.options())
