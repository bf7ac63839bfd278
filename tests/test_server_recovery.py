"""`pipeserve serve -pp 2` heals a killed stage while it streams: clients see a pause (with SSE keep-alive
comments), never an error; /health says "recovering" meanwhile; /metrics counts the restart. A final
failure makes `serve` exit non-zero, and a killed `serve` takes its stage processes with it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import rank_pid, tiny_with_tokenizer
from server_utils import metric_sum, read_metrics, start_server, wait_all_gone

pytestmark = pytest.mark.slow

PROMPTS = [f"Story {i}: once upon a time" for i in range(8)]
N_OUT = 160


def stream(url: str, prompt: str, on_chunk=None) -> tuple[str, list[str]]:
    """Stream one completion; returns its text and every SSE line that was not data (comments, errors)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": N_OUT, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, other = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        chunks = 0
        for line in resp.iter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                other.append(line)
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                other.append(line)
                continue
            text += event["choices"][0]["text"]
            chunks += 1
            if on_chunk:
                on_chunk(chunks)
    return text, other


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_with_tokenizer(tmp_path_factory)


def serve_args(*extra: str) -> list[str]:
    return ["-pp", "2", "--threads-per-worker", "1", "--dtype", "float32", "--max-model-len", "256",
            "--num-kv-blocks", "256", "--served-model-name", "tiny", "--disable-access-log", *extra]


def test_killed_stage_while_streaming_loses_nothing(model_path, tmp_path):
    server = start_server(model_path, tmp_path / "server.log", serve_args("--sse-keepalive-s", "0.5"))
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            reference = list(pool.map(lambda p: stream(server.url, p)[0], PROMPTS))
        victim = rank_pid(server.proc.pid, 1)
        killed = threading.Event()

        def kill_once(chunks: int) -> None:
            if chunks == 20 and not killed.is_set():
                killed.set()
                os.kill(victim, signal.SIGKILL)

        health: list[tuple[int, str]] = []
        done = threading.Event()

        def watch_health() -> None:
            killed.wait(60)
            while not done.is_set():
                r = httpx.get(f"{server.url}/health", timeout=5)
                health.append((r.status_code, r.json().get("status", "")))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: stream(server.url, p, kill_once), PROMPTS))
        done.set()
        watcher.join()

        assert killed.is_set()
        assert [text for text, _ in results] == reference
        others = [line for _, lines in results for line in lines]
        assert not [line for line in others if "error" in line]
        assert ": keep-alive" in others  # paused streams were kept alive
        assert (503, "recovering") in health and health[-1] == (200, "ok")
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert stream(server.url, "A new request")[0]
        metrics = read_metrics(server.url)
        assert metric_sum(metrics, "pipeserve_stage_restarts_total", stage="1") == 1
        assert metric_sum(metrics, "pipeserve_stage_restarts_total", stage="0") == 0
        assert metric_sum(metrics, "pipeserve_recovery_seconds_count") == 1
        assert metric_sum(metrics, "pipeserve_requests_recomputed_total") >= 1
        assert "pipeline stage 1 on the head node" in server.log_text()

        # kill -9 of the engine: its stage processes follow within seconds.
        stages = [rank_pid(server.proc.pid, r) for r in (0, 1)]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        assert wait_all_gone(stages, timeout_s=10) == []
    finally:
        server.stop()


def test_final_failure_makes_serve_exit_non_zero(model_path, tmp_path):
    server = start_server(model_path, tmp_path / "server.log", serve_args("--max-stage-restarts", "0"))
    try:
        stages = [rank_pid(server.proc.pid, r) for r in (0, 1)]
        os.kill(stages[1], signal.SIGKILL)
        assert server.proc.wait(timeout=60) != 0
        assert "giving up after 0 restarts" in server.log_text()
        assert wait_all_gone(stages, timeout_s=10) == []
    finally:
        server.stop()
