"""`pipeserve plan --png F` draws the fitting layouts into a PNG; an unwritable path is one line, exit 2."""

from __future__ import annotations

from tests.planner_fixtures import pipeserve_plan


def test_png_of_the_layouts(tmp_path):
    path = tmp_path / "plan.png"
    r = pipeserve_plan("--model", "llama-3-8b", "--gpu", "H100", "--gpus-per-node", "4", "--png", str(path))
    assert r.returncode == 0, r.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = pipeserve_plan("--model", "llama-3-8b", "--gpu", "H100", "--png", str(tmp_path / "no" / "x.png"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot write it" in bad.stderr
