"""A shortened soak: a few hundred mixed requests through the HTTP server at PP=2, a share of them streams
whose client hangs up after the first chunk, some malformed. Afterwards every per-request structure of the
engine, the executor and both stage processes is empty and every KV block is back. Memory is not checked
here (too noisy for a test): `benchmarks/bench_soak.py` measures it."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest
import uvicorn
from helpers import leftover_bookkeeping
from server_utils import metric_sum, read_metrics

from pipeserve.control.process import free_port
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
from pipeserve.entrypoints.openai.launcher import build_engine

pytestmark = pytest.mark.slow
NUM_REQUESTS = 300


@pytest.fixture(scope="module")
def server(tiny_model):
    # A small KV pool: requests preempt and recompute, cached prefixes are evicted and reused.
    engine = build_engine(EngineArgs(tiny_model, dtype="float32", pipeline_parallel_size=2, threads_per_worker=1,
                                     max_model_len=192, num_kv_blocks=24, max_num_batched_tokens=32))
    port = free_port()
    app = build_app(engine, ServeSettings(served_model_names=["tiny"], port=port))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=60)


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, shared: list[int]) -> str:
    prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 60))]
    if rng.random() < 0.3:
        prompt = shared + prompt
    body = {"model": "tiny", "prompt": prompt, "max_tokens": rng.randint(1, 16), "ignore_eos": True,
            "temperature": rng.choice([0.0, 0.9]), "n": rng.choice([1, 1, 1, 2])}
    kind = rng.choices(["whole", "stream", "hang_up", "bad"], [5, 2, 2, 1])[0]
    if kind == "bad":
        r = await client.post(f"{url}/v1/completions", json={**body, "max_tokens": 1000})  # over max_model_len
        assert r.status_code == 400
        return kind
    if kind == "whole":
        r = await client.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return kind
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if kind == "hang_up" and line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream
    return kind


async def drive(url: str) -> list[str]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 300) for _ in range(40)]
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=120) as client:
        async def limited() -> str:
            async with sem:
                return await one(client, url, rng, shared)

        return await asyncio.gather(*(limited() for _ in range(NUM_REQUESTS)))


def test_bookkeeping_returns_to_empty_after_a_short_soak(server):
    engine, url = server
    kinds = asyncio.run(drive(url))
    assert min(kinds.count(k) for k in ("whole", "stream", "hang_up", "bad")) >= 20
    deadline = time.monotonic() + 30  # the server notices the last hung-up clients as it writes to them
    while any(engine.bookkeeping().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_bookkeeping(engine) == {}
    metrics = read_metrics(url)
    assert metric_sum(metrics, "pipeserve_kv_blocks_used") == 0
    assert metric_sum(metrics, "pipeserve_request_success_total", finished_reason="abort") > 0  # hang-ups seen
