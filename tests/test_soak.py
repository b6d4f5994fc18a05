"""The soak benchmark, bounded to 30 s as CI runs it: mixed good and hostile traffic against a
real server, with no unexpected status, no 5xx and no failed connection."""

from __future__ import annotations

import json

import pytest

from benchmarks import soak


@pytest.mark.slow
def test_a_30_second_soak_meets_every_expectation(tiny_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "soak.json"
    code = soak.main(["--seconds", "30", "--model", str(tiny_checkpoint), "--out", str(out)])
    result = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb"}), result["rss_mb"])
    assert code == 0, result
    assert result["unexpected"] == 0 and result["errors"] == 0 and result["server_alive_at_end"]
    assert result["requests"] >= 100
    hostile = {"corrupt_image", "wrong_type", "bad_option", "unknown_path", "abandoned_upload"}
    assert hostile <= set(result["by_kind"]) and "frame_list" in result["by_kind"]
    assert {"200", "400"} <= set(result["statuses"])
    assert len(result["rss_mb"]["samples"]) >= 10
