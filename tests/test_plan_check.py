"""benchmarks/plan_check.py's smallest cases on a tiny checkpoint: calibrate (once), run PP=1 and PP=2, plan, and
compare.

Each stage's weights + KV pool must be what the plan says within 10% (tensor bytes: deterministic). Throughput
is only reported: no timing asserts on a shared machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plan_check.py")


@pytest.mark.slow
def test_plan_check_memory_matches_the_runs(tiny_model, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--model", tiny_model, "--cases", "pp1,pp2", "--num-prompts", "4",
                           "--input-len", "32", "--output-len", "8", "--max-model-len", "256",
                           "--single-calibration", "--output-json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["case"] for r in results] == ["pp1", "pp2"]
    for r in results:
        assert len(r["predicted_stage_bytes"]) == len(r["measured_stage_bytes"]) == (2 if r["case"] == "pp2" else 1)
        assert r["memory_error"] <= 0.10, r
        assert r["predicted_tok_s"] > 0 and r["measured_tok_s"] > 0
    assert "| pp2 |" in proc.stdout  # the pasteable table
