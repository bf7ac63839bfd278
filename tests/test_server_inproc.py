"""The server's pieces without subprocesses: the app in-process on PP=1 (forward passes in a thread), the
middleware on a toy app, request-shape validation, and the serving benchmark's statistics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_utils import metric_sum

from pipeserve.bench.serve import BenchConfig, RequestResult, _stats_ms, summarize
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
from pipeserve.entrypoints.openai.errors import describe_validation_errors
from pipeserve.entrypoints.openai.launcher import build_engine
from pipeserve.entrypoints.openai.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from pipeserve.entrypoints.openai.protocol import normalize_prompt
from pipeserve.entrypoints.openai.startup import base_url, curl_example

PROMPT = [(5 + 11 * i) % 300 + 3 for i in range(9)]


@pytest.fixture(scope="module")
def app_client(tiny_model):
    engine = build_engine(EngineArgs(tiny_model, dtype="float32", max_model_len=128, num_kv_blocks=32,
                                     threads_per_worker=1))
    app = build_app(engine, ServeSettings(served_model_names=["tiny"]))
    with TestClient(app) as client:  # runs the lifespan: engine loops up, shutdown at exit
        yield client
    assert engine.is_shut_down


def _metrics(client) -> dict:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_pp1_completion_stream_and_metrics(app_client):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = app_client.post("/v1/completions", json=body).json()
    assert whole["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    events = []
    with app_client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    m = _metrics(app_client)
    assert metric_sum(m, "pipeserve_stage_busy_seconds_total", stage="0") > 0  # PP=1 knows its busy time
    assert metric_sum(m, "pipeserve_kv_blocks_used") == 0


def test_a_bad_prompt_in_a_list_starts_nothing(app_client):
    before = _metrics(app_client)
    body = {"prompt": [PROMPT, [5, 10**6]], "max_tokens": 2}  # the second prompt has a token outside the vocab
    r = app_client.post("/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and err["message"].startswith("prompt 1: prompt token")
    after = _metrics(app_client)
    for name in ("pipeserve_prefix_cache_queries_total", "pipeserve_request_success_total"):
        assert metric_sum(after, name) == metric_sum(before, name), name  # the first was never admitted
    assert metric_sum(after, "pipeserve_kv_blocks_used") == 0


def test_stop_lists_at_the_limits_are_accepted(app_client):
    stops = [f"{i:04d}" * 256 for i in range(64)]  # 64 strings of 1,024 characters: the most allowed by default
    r = app_client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stop": stops})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_pp1_prefix_cache_in_usage_and_metrics(app_client):
    prompt = [(7 + 13 * i) % 300 + 3 for i in range(40)]  # 2 full blocks of 16 can be reused
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    before = _metrics(app_client)
    first = app_client.post("/v1/completions", json=body).json()
    again = app_client.post("/v1/completions", json=body).json()
    salted = app_client.post("/v1/completions", json={**body, "cache_salt": "tenant-b"}).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert salted["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # another tenant's cache
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    m = _metrics(app_client)
    for name, grew in (("pipeserve_prefix_cache_queries_total", 3 * 40), ("pipeserve_prefix_cache_hits_total", 32)):
        assert metric_sum(m, name) - metric_sum(before, name) == grew, name
    assert metric_sum(m, "pipeserve_kv_blocks_used") == 0 and metric_sum(m, "pipeserve_kv_blocks_cached") > 0
    bad = app_client.post("/v1/completions", json={**body, "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


def test_pp1_without_tokenizer_text_and_chat_are_400(app_client):
    text = app_client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert text.status_code == 400 and "token ids" in text.json()["error"]["message"]
    chat = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    assert app_client.get("/health").status_code == 200


def _toy_app(**middleware) -> TestClient:
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(payload: dict) -> dict:
        return {"n": len(json.dumps(payload))}

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=100)
    if middleware.get("api_key"):
        app.add_middleware(APIKeyMiddleware, api_key=middleware["api_key"])
    return TestClient(app)


def test_body_limit_counts_chunked_uploads():
    client = _toy_app()
    assert client.post("/v1/echo", json={"a": "x" * 10}).status_code == 200
    chunked = client.post("/v1/echo", content=(b'{"a": "' + b"x" * 60 + b'"}' for _ in range(3)))
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert client.post("/v1/echo", content=b"{" + b" " * 200 + b"}").status_code == 413


def test_api_key_only_guards_v1():
    client = _toy_app(api_key="k")
    assert client.post("/v1/echo", json={}).status_code == 401
    assert client.post("/v1/echo", json={}, headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.get("/health").status_code == 404  # not guarded (and not defined on the toy app)


@pytest.mark.parametrize("prompt, ok", [
    ("text", True), (["a", "b"], True), ([1, 2, 3], True), ([[1, 2], [3]], True),
    ([], False), ([1, "a"], False), ([True, 2], False), ([[1.0]], False), (3, False), ({"a": 1}, False),
])
def test_prompt_shapes(prompt, ok):
    if ok:
        assert normalize_prompt(prompt) == prompt
    else:
        with pytest.raises(ValueError, match="prompt must be"):
            normalize_prompt(prompt)


def test_validation_messages_name_the_field():
    msg, param = describe_validation_errors([{"loc": ("body", "max_tokens"), "msg": "Input should be a valid "
                                              "integer", "type": "int_type"}])
    assert msg == "max_tokens: Input should be a valid integer" and param == "max_tokens"
    msg, _ = describe_validation_errors([{"loc": ("body", "prompt"), "msg": "x", "type": "missing"}])
    assert msg == "prompt: field required"


def test_bench_statistics_follow_vllm_definitions():
    assert _stats_ms([0.001 * i for i in range(1, 101)])["p99"] == pytest.approx(99.01)
    cfg = BenchConfig(base_url="u", model="m", input_len=4, output_len=3, num_prompts=2)
    results = [RequestResult(ok=True, ttft=0.1, e2e=0.5, itl=[0.2, 0.2], prompt_tokens=4, output_tokens=3),
               RequestResult(error="HTTP 400: bad")]
    s = summarize(cfg, "m", results, duration=2.0)
    assert s["completed"] == 1 and s["failed"] == 1 and s["errors"] == ["HTTP 400: bad"]
    assert s["tpot_ms"]["mean"] == pytest.approx(200.0)  # (e2e - ttft) / (tokens - 1)
    assert s["itl_ms"]["median"] == pytest.approx(200.0)
    assert s["output_throughput"] == pytest.approx(1.5)


def test_curl_line():
    url = base_url("0.0.0.0", 8000)
    assert url == "http://127.0.0.1:8000"
    line = curl_example(url, "tiny", with_api_key=True)
    assert line.startswith("curl http://127.0.0.1:8000/v1/completions") and "$PIPESERVE_API_KEY" in line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeserve.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_serve_bad_flags_exit_cleanly(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [(["--port", port], "cannot listen"), (["--max-model-len", "1", "--port", "0"], "max_model_len"),
                 (["--model", "/elsewhere", "--port", "0"], "two models")]
        for flags, match in cases:
            r = _cli("serve", tiny_model, "--dtype", "float32", "--threads-per-worker", "1", *flags)
            assert r.returncode != 0 and match in r.stderr, r.stderr[-2000:]
            assert "Traceback" not in r.stderr
    r = _cli("bench", "serve", "--num-prompts", "0")
    assert r.returncode != 0 and "num_prompts" in r.stderr and "Traceback" not in r.stderr


def test_keepalive_stream_closed_as_its_source_ends_logs_nothing():
    """A client that leaves just as the stream's source ends: the finished read is seen, not left for asyncio
    to log as "Task exception was never retrieved" (it did so a few times per 10,000 requests in the soak)."""
    import asyncio
    import gc

    from pipeserve.entrypoints.openai.streams import SSE_KEEPALIVE, with_keepalive

    async def scenario() -> list:
        logged = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: logged.append(ctx))
        release = asyncio.Event()

        async def source():
            await release.wait()
            return
            yield  # an async generator that ends without an item

        stream = with_keepalive(source(), interval_s=0.01)
        assert await anext(stream) == SSE_KEEPALIVE  # the source is silent; its read is pending
        release.set()
        await asyncio.sleep(0.05)  # the pending read ends (StopAsyncIteration) while the client is away
        await stream.aclose()  # the client hangs up
        gc.collect()
        await asyncio.sleep(0)
        return logged

    assert asyncio.run(scenario()) == []
