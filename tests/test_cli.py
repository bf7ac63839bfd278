"""The `pipeserve` command, run as a subprocess the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import tiny_with_tokenizer


def pipeserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "pipeserve.entrypoints.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_raw(tmp_path_factory):
    model = tiny_with_tokenizer(tmp_path_factory)
    r = pipeserve("generate", "--model", model, "--prompt", "hi", "--max-tokens", "5", "--dtype", "float32",
                  "--raw", "--threads-per-worker", "1")
    assert r.returncode == 0, r.stderr
    assert ">>> hi" in r.stdout
    assert "finish_reason" in r.stdout
    assert "Traceback" not in r.stderr


def test_bench_throughput_writes_json(tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    r = pipeserve("bench", "throughput", "--model", tiny_model, "--input-len", "8", "--output-len", "4",
                  "--num-prompts", "3", "--output-json", str(out), "--dtype", "float32", "--threads-per-worker", "1")
    assert r.returncode == 0, r.stderr
    assert "Throughput" in r.stdout
    result = json.loads(out.read_text())
    for key in ("elapsed_s", "num_requests", "total_input_tokens", "total_output_tokens", "requests_per_s",
                "output_tokens_per_s", "total_tokens_per_s", "engine_config"):
        assert key in result, key
    assert result["num_requests"] == 3
    assert result["total_input_tokens"] == 24
    assert result["total_output_tokens"] == 12
    assert result["elapsed_s"] > 0
    assert result["requests_per_s"] == pytest.approx(3 / result["elapsed_s"])
    assert result["output_tokens_per_s"] == pytest.approx(12 / result["elapsed_s"])
    assert result["total_tokens_per_s"] == pytest.approx(36 / result["elapsed_s"])
    cfg = result["engine_config"]
    assert cfg["model"]["dtype"] == "float32"
    assert cfg["model"]["path"] == os.path.abspath(tiny_model)
    assert cfg["parallel"]["threads_per_worker"] == 1
    busy = result["stage_busy_fraction"]
    assert len(busy) == 1 and 0 < busy[0] <= 1
    assert result["pipeline_bubble_fraction"] == pytest.approx(1 - busy[0])
    (mem,) = result["rank_memory"]  # one rank: its weights, KV pool and resident memory
    assert mem["weights_bytes"] > 0 and mem["kv_bytes"] > 0 and mem["peak_rss_bytes"] >= mem["rss_bytes"] > 0


def test_bench_throughput_reports_each_stage_of_a_pipeline(tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    r = pipeserve("bench", "throughput", "--model", tiny_model, "-pp", "2", "--input-len", "16", "--output-len", "8",
                  "--num-prompts", "4", "--output-json", str(out), "--dtype", "float32", "--threads-per-worker", "1")
    assert r.returncode == 0, r.stderr
    assert "Stage busy: stage 0" in r.stdout and "stage 1" in r.stdout
    result = json.loads(out.read_text())
    assert len(result["stage_busy_fraction"]) == 2 and all(0 < b <= 1 for b in result["stage_busy_fraction"])
    sent = result["rank_bytes_sent"]  # stage 0 hands (hidden, residual) on; the last stage sends nothing
    assert sent[0] > 0 and sent[1] == 0


def test_bad_flag_value_exits_cleanly(tiny_model):
    r = pipeserve("generate", "--model", tiny_model, "--max-model-len", "1", "--dtype", "float32",
                  "--threads-per-worker", "1", "--prompt", "hi")
    assert r.returncode != 0
    assert "max_model_len" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("command, flags, match", [
    ("generate", ["--max-tokens", "0"], "max_tokens"),
    ("generate", ["--model", "/nonexistent/model"], "/nonexistent/model"),
    ("bench", ["--input-len", "0"], "input_len"),
    ("generate", ["--device", "nosuch"], "device"),
    ("bench", ["--num-prompts", "0"], "num_prompts"),
])
def test_more_bad_flag_values_exit_cleanly(tiny_model, command, flags, match):
    if command == "generate":
        base = ["generate", "--prompt", "hi", "--max-tokens", "2"]
    else:
        base = ["bench", "throughput", "--input-len", "4", "--output-len", "2", "--num-prompts", "1"]
    args = base + ["--model", tiny_model, "--dtype", "float32", "--threads-per-worker", "1"] + flags
    r = pipeserve(*args)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert r.returncode != 0
    assert match in r.stderr
