from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from captioner import __version__
from captioner.cli import main, passive_openmp_waits
from tests.conftest import make_video


def test_caption_prints_one_json_line_per_good_input_and_one_error(
    tmp_path, tiny_checkpoint, capsys
) -> None:
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "img.png")
    make_video(tmp_path / "clip.mp4", "libx264", num_frames=12)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code = main(
        [
            "caption",
            str(tmp_path / "img.png"),
            str(tmp_path / "clip.mp4"),
            str(tmp_path / "broken.jpg"),
            "--model",
            str(tiny_checkpoint),
            "--beam-size",
            "3",
            "--num-captions",
            "2",
            "--max-length",
            "5",
        ]
    )
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [line["path"] for line in lines] == [
        str(tmp_path / "img.png"),
        str(tmp_path / "clip.mp4"),
    ]
    for line in lines:
        assert set(line) == {
            "path", "caption", "captions", "in_domain", "domain_score", "warnings", "seconds"
        }  # fmt: skip
        assert line["in_domain"] is None and line["warnings"] == []  # no domain summary
        assert len(line["captions"]) == 2
        assert line["caption"] == line["captions"][0]["text"]
        assert line["captions"][0]["log_prob"] <= 0 and line["seconds"] > 0
    assert err.count("\n") == 1 and "broken.jpg" in err and "Traceback" not in err


def test_folders_are_expanded_and_table_format(tmp_path, tiny_checkpoint, capsys) -> None:
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    code = main(
        [
            "caption",
            str(tmp_path),
            "--model",
            str(tiny_checkpoint),
            "--format",
            "table",
            "--batch-size",
            "2",
            "--beam-size",
            "3",
            "--num-captions",
            "2",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header == ["path", "rank", "caption", "score", "in_domain", "tags", "seconds"]
    assert [(row[0], row[1]) for row in rows] == [  # every caption of the n-best, ranked
        (str(tmp_path / f"{i}.png"), rank) for i in range(3) for rank in ("1", "2")
    ]
    assert all(len(row) == len(header) for row in rows)
    assert float(rows[0][3]) >= float(rows[1][3])  # ranked by the score shown


def test_version_and_help(capsys) -> None:

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"captioner {__version__}\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "main(argv)" not in text and "Caption images and videos" in text
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "beams searched, 1 to 10 (default 3, from the model)" in text
    assert "top K ImageNet tags, 0 to 20" in text


def test_bad_model_and_bad_option_are_one_line_errors(tmp_path, tiny_checkpoint, capsys) -> None:
    assert main(["caption", "x.png", "--model", str(tmp_path / "nope")]) == 2
    assert main(["caption", "x.png", "--model", str(tiny_checkpoint), "--beam-size", "0"]) == 2
    _, err = capsys.readouterr()
    assert err.count("captioner: error:") == 2 and "Traceback" not in err


def test_evaluate_with_nothing_to_score_is_an_error(tmp_path, tiny_checkpoint, capsys) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.png", "captions": [], "split": "test"}) + "\n")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(manifest),
                 "--out", str(out), "--no-java"])  # fmt: skip
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "captioner: error: nothing to score: none of the 1 items has reference captions; "
        "evaluate a split that has them (--split test or val)\n"
    )
    assert not (out / "metrics.json").exists()


def test_evaluate_when_no_captioned_item_can_be_read_is_an_error(
    tmp_path, tiny_checkpoint, capsys
) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.png", "captions": ["x"], "split": "test"}) + "\n")
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(manifest),
                 "--no-java"])  # fmt: skip
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nothing to score: none of the 1 items with reference captions could be read" in last


def test_a_one_frame_gif_is_captioned_as_an_image(tmp_path, tiny_checkpoint, capsys) -> None:
    Image.new("RGB", (40, 40), (0, 90, 200)).save(tmp_path / "still.gif")
    assert main(["caption", str(tmp_path / "still.gif"), "--model", str(tiny_checkpoint)]) == 0
    (line,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert line["caption"]


def test_inference_commands_let_openmp_threads_sleep_before_torch_loads() -> None:
    program = (
        "import os, sys\n"
        "from captioner.cli import passive_openmp_waits\n"
        "print(passive_openmp_waits(sys.argv[1]), os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def run(command: str, **extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", program, command],
            env=env | extra, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    assert run("serve") == "True PASSIVE"
    assert run("batch") == "True PASSIVE"
    assert run("train") == "False None"  # training keeps OpenMP's default
    assert run("serve", OMP_WAIT_POLICY="ACTIVE") == "True ACTIVE"  # the operator's wins
    # Once torch is loaded OpenMP has read its settings: nothing is changed then.
    assert passive_openmp_waits("serve") is False
