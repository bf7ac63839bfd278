"""benchmarks/bench_gpu.py in its CPU smoke mode (a tiny shape, a few tokens), so a change that breaks the GPU
benchmark shows up without a GPU. It must import nothing the GPU machines lack (gguf, FastAPI, pydantic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = """
import runpy, sys
class Block:  # the GPU machines have none of these
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("gguf", "fastapi", "pydantic", "uvicorn"):
            raise ImportError(name + " is not installed on the GPU machines")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_bench_gpu_smoke_runs_and_reports(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "bench_gpu.py")
    copy = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", BLOCK, script, "--smoke", "--results-dir", str(tmp_path),
                           "--copy-to", str(copy), "--commit", "abc123"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert (copy / "gpu_smoke.json").read_text() == (tmp_path / "gpu_smoke.json").read_text()
    text = (tmp_path / "gpu_smoke.md").read_text()
    assert "`abc123`" in text and (copy / "gpu_smoke.md").read_text() == text
    tiny = results["shapes"]["tiny"]
    assert all(r["tok_s"] > 0 and r["output_tokens"] > 0 for r in tiny["pipeserve"]["workloads"].values())
    assert set(tiny["hf"]) == {w["name"] for w in tiny["workloads"] if w["hf_output_len"]}
    steps = tiny["limits"]["steps"]
    assert set(steps) == {"1", "8", "64"} and all(s["step_s"] > 0 and s["limit_s"] > 0 for s in steps.values())
    assert tiny["pipeserve"]["kernels_per_decode_step"]["per_step"] > 0
    assert all(0 < w["fraction"] for w in tiny["limits"]["workloads"].values())
    # the GPU's idle share needs CUDA events: a column on every workload, n/a on the CPU
    assert all(r["gpu_idle_between_decodes"] is None for r in tiny["pipeserve"]["workloads"].values())
    assert "GPU idle between decode steps |" in text and "untimed run of its prompts" in text
    compared = {w["name"] for w in tiny["workloads"] if w["compare_async"]}
    assert set(tiny["pipeserve_sync"]["workloads"]) == compared and len(compared) == 2
    assert tiny["pipeserve"]["planned_ahead"] > 0 and tiny["pipeserve_sync"]["planned_ahead"] == 0
    assert tiny["pipeserve"]["gpu_idle_kernels"] is None  # the profiler's device timeline needs CUDA
    # every table has its rows (the async-vs-sync table: the compared workloads)
    assert text.count("| tiny |") == len(tiny["workloads"]) + len(steps) + 1 + len(compared)
