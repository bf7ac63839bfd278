"""The HTTP server end to end: `pipeserve serve -pp 2` as a subprocess, driven by the official openai client.

One server per module (a tiny random Llama with SmolLM2's tokenizer, one torch thread per stage); greedy
outputs are compared with the offline `LLM` API on the same model.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import tiny_with_tokenizer
from server_utils import alive, child_pids, metric_sum, read_metrics, start_server

from pipeserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
MODEL = "tiny"
MAX_LEN = 256
MAX_BODY = 64 * 1024
TEXTS = ["Hello world", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
IDS = [[(7 + 13 * i) % 300 + 3 for i in range(n)] for n in (5, 40)]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]
N_OUT = 12


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_with_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["-pp", "2", "--pp-layer-partition", "2,2", "--threads-per-worker", "1", "--dtype", "float32",
            "--max-model-len", str(MAX_LEN), "--num-kv-blocks", "128", "--served-model-name", MODEL,
            "--max-request-bytes", str(MAX_BODY), "--disable-access-log"]
    srv = start_server(model_path, log, args, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(model_path):
    """Greedy reference outputs from the offline API (PP=1, same model and limits)."""
    params = SamplingParams(temperature=0.0, max_tokens=N_OUT, ignore_eos=True)
    with LLM(model_path, dtype="float32", max_model_len=MAX_LEN, threads_per_worker=1, num_kv_blocks=64) as llm:
        outs = llm.generate(TEXTS + [{"prompt_token_ids": p} for p in IDS], params)
        chat = llm.chat(CHAT, params)[0]
    return {"completions": [o.outputs[0] for o in outs], "prompt_lens": [len(o.prompt_token_ids) for o in outs],
            "chat": chat.outputs[0], "chat_prompt_len": len(chat.prompt_token_ids)}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


GREEDY = dict(temperature=0, max_tokens=N_OUT, extra_body={"ignore_eos": True})


# ---- startup, discovery ----------------------------------------------------------------------------------


def test_startup_log_models_health_version(server, client):
    log = server.log_text()
    for needle in ("stage 0: layers [0, 2) + embedding", "stage 1: layers [2, 4) + final norm + LM head",
                   "tokens per virtual engine", "max concurrency", f"ready: {server.url}", "curl "):
        assert needle in log, needle
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert "version" in httpx.get(f"{server.url}/version").json()


# ---- completions and chat against the offline API ----------------------------------------------------


@pytest.mark.parametrize("i", range(len(TEXTS) + len(IDS)))
def test_completion_matches_offline(client, offline, i):
    prompt = (TEXTS + IDS)[i]
    resp = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    expected = offline["completions"][i]
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == offline["prompt_lens"][i]
    assert resp.usage.completion_tokens == N_OUT
    assert resp.usage.total_tokens == offline["prompt_lens"][i] + N_OUT


def test_streamed_completion_matches_offline(client, offline):
    stream = client.completions.create(model=MODEL, prompt=TEXTS[1], stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline["completions"][1].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N_OUT
    assert chunks[-1].usage.prompt_tokens == offline["prompt_lens"][1]


def test_batch_of_prompts_one_choice_each(client, offline):
    resp = client.completions.create(model=MODEL, prompt=TEXTS[:2], **GREEDY)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == [offline["completions"][i].text for i in range(2)]
    assert resp.usage.completion_tokens == 2 * N_OUT


def test_chat_matches_offline(client, offline):
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=N_OUT,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == offline["chat"].text
    assert resp.usage.prompt_tokens == offline["chat_prompt_len"] and resp.usage.completion_tokens == N_OUT
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **GREEDY,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline["chat"].text
    assert chunks[-1].usage.total_tokens == offline["chat_prompt_len"] + N_OUT


def test_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt=TEXTS[0], logprobs=2, **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == N_OUT
    assert all(v <= 0 for v in lp.token_logprobs) and all(lp.top_logprobs)  # two ids may decode alike
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == N_OUT and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the chosen token is the top


def test_concurrent_clients(client, offline):
    def run(i: int) -> str:
        prompt = (TEXTS + IDS)[i % (len(TEXTS) + len(IDS))]
        if i % 2:
            return client.completions.create(model=MODEL, prompt=prompt, **GREEDY).choices[0].text
        stream = client.completions.create(model=MODEL, prompt=prompt, stream=True, **GREEDY)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(run, range(12)))
    n = len(TEXTS) + len(IDS)
    assert texts == [offline["completions"][i % n].text for i in range(12)]


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=MODEL, prompt=IDS[1], max_tokens=MAX_LEN)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


# ---- bad requests: a clear 4xx, and the server keeps serving ---------------------------------------------

GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [  # through a real server process; test_server_validation.py has the full table, in-process
    # (name, path, body (dict or raw bytes), headers override, status, error type, fragment of the message)
    ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', None, 400, "invalid_request_error", "JSON"),
    ("body is a list", "/v1/completions", b"[1, 2]", None, 400, "invalid_request_error", ""),
    ("empty body", "/v1/completions", b"", None, 400, "invalid_request_error", ""),
    ("max_tokens wrong type", "/v1/completions", {**GOOD, "max_tokens": "ten"}, None, 400, "invalid_request_error",
     "max_tokens"),
    ("temperature wrong type", "/v1/completions", {**GOOD, "temperature": "hot"}, None, 400,
     "invalid_request_error", "temperature"),
    ("temperature NaN", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', None, 400,
     "invalid_request_error", "temperature"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, None, 400, "invalid_request_error", "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, None, 400, "invalid_request_error", "messages"),
    ("unknown model", "/v1/completions", {**GOOD, "model": "gpt-9"}, None, 404, "not_found_error", "gpt-9"),
    ("over the context", "/v1/completions", {**GOOD, "prompt": IDS[1], "max_tokens": 250}, None, 400,
     "invalid_request_error", "max_model_len"),
    ("absurd max_tokens", "/v1/completions", {**GOOD, "max_tokens": 10**30}, None, 400, "invalid_request_error",
     "max_tokens"),
    ("negative max_tokens", "/v1/completions", {**GOOD, "max_tokens": -5}, None, 400, "invalid_request_error",
     "max_tokens"),
    ("negative temperature", "/v1/completions", {**GOOD, "temperature": -1}, None, 400, "invalid_request_error",
     "temperature"),
    ("top_p over 1", "/v1/completions", {**GOOD, "top_p": 5}, None, 400, "invalid_request_error", "top_p"),
    ("too many logprobs", "/v1/completions", {**GOOD, "logprobs": 100}, None, 400, "invalid_request_error",
     "logprobs"),
    ("empty prompt", "/v1/completions", {**GOOD, "prompt": ""}, None, 400, "invalid_request_error", "empty"),
    ("empty prompt list", "/v1/completions", {**GOOD, "prompt": []}, None, 400, "invalid_request_error", "prompt"),
    ("float token ids", "/v1/completions", {**GOOD, "prompt": [1.5, 2]}, None, 400, "invalid_request_error",
     "prompt"),
    ("token id out of vocab", "/v1/completions", {**GOOD, "prompt": [5, 10**9]}, None, 400,
     "invalid_request_error", "[0, 49152)"),
    ("stop token out of vocab", "/v1/completions", {**GOOD, "stop_token_ids": [10**6], "min_tokens": 1}, None,
     400, "invalid_request_error", "stop_token_ids"),
    ("stream_options without stream", "/v1/completions", {**GOOD, "stream_options": {"include_usage": True}},
     None, 400, "invalid_request_error", "stream_options"),
    ("empty messages", "/v1/chat/completions", {**CHAT_OK, "messages": []}, None, 400, "invalid_request_error",
     "messages"),
    ("bad role", "/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "wizard", "content": "hi"}]}, None,
     400, "invalid_request_error", "role"),
    ("image content", "/v1/chat/completions",
     {**CHAT_OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     None, 400, "invalid_request_error", "text"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, None, 400,
     "invalid_request_error", "logprobs"),
    ("body over the limit", "/v1/completions", {**GOOD, "prompt": "x" * (2 * MAX_BODY)}, None, 413,
     "invalid_request_error", "limit"),
    ("missing api key", "/v1/completions", GOOD, {}, 401, "authentication_error", "API key"),
    ("wrong api key", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, "authentication_error",
     "API key"),
    ("unknown route", "/v1/nothing-here", GOOD, None, 404, "not_found_error", ""),
]


@pytest.mark.parametrize("name, path, body, headers, status, err_type, fragment", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(server, name, path, body, headers, status, err_type, fragment):
    hdrs = server.headers() if headers is None else headers
    if isinstance(body, bytes):
        resp = httpx.post(server.url + path, content=body, headers={**hdrs, "Content-Type": "application/json"})
    else:
        resp = httpx.post(server.url + path, json=body, headers=hdrs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == err_type and fragment in error["message"], error
    good = httpx.post(f"{server.url}/v1/completions", json=GOOD, headers=server.headers())
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_method_not_allowed_is_json(server):
    resp = httpx.get(f"{server.url}/v1/completions", headers=server.headers())
    assert resp.status_code == 405 and "message" in resp.json()["error"]


# ---- aborts and metrics ----------------------------------------------------------------------------------


def test_disconnected_stream_frees_its_blocks(server):
    before = read_metrics(server.url)
    body = {"model": MODEL, "prompt": IDS[0], "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers=server.headers()) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            chunks = [next(lines) for _ in range(6)]  # three tokens (each event is a line and a blank)
            assert sum(line.startswith("data: {") for line in chunks) >= 3
            during = read_metrics(server.url)
            assert metric_sum(during, "pipeserve_kv_blocks_used") > 0
    deadline = time.monotonic() + 10
    while True:
        after = read_metrics(server.url)
        if not metric_sum(after, "pipeserve_kv_blocks_used") + metric_sum(after, "pipeserve_num_requests_running"):
            break
        assert time.monotonic() < deadline, "blocks were not freed after the client went away"
        time.sleep(0.05)
    aborted = metric_sum(after, "pipeserve_request_success_total", finished_reason="abort")
    assert aborted == metric_sum(before, "pipeserve_request_success_total", finished_reason="abort") + 1
    tokens = "pipeserve_generation_tokens_total"
    generated = metric_sum(after, tokens) - metric_sum(before, tokens)
    assert generated < 200  # it stopped early rather than running to max_tokens


def test_metrics_series(server, client):
    client.completions.create(model=MODEL, prompt=TEXTS[0], **GREEDY)
    m = read_metrics(server.url)
    for ve in ("0", "1"):  # one series per virtual engine
        assert ("pipeserve_kv_blocks_total", (("virtual_engine", ve),)) in m
        assert ("pipeserve_num_requests_waiting", (("virtual_engine", ve),)) in m
    assert metric_sum(m, "pipeserve_prompt_tokens_total") > 0
    assert metric_sum(m, "pipeserve_generation_tokens_total") >= N_OUT
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert metric_sum(m, f"pipeserve_{name}_count") > 0, name
    assert metric_sum(m, "pipeserve_pipeline_busy_seconds_total") > 0
    for stage in ("0", "1"):  # each stage process reports its compute time (at its first step, then each second)
        assert metric_sum(m, "pipeserve_stage_busy_seconds_total", stage=stage) > 0, stage
    assert metric_sum(m, "pipeserve_request_success_total", finished_reason="length") > 0


def test_bench_serve_against_server(server, tmp_path):
    from pipeserve.bench.serve import BenchConfig, run_bench_serve

    out = tmp_path / "bench.json"
    cfg = BenchConfig(base_url=server.url, model=MODEL, input_len=16, output_len=6, num_prompts=6,
                      request_rate=50.0, max_concurrency=4, vocab_size=49152, api_key=API_KEY)
    result = run_bench_serve(cfg, str(out))
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 36 and result["total_input_tokens"] == 96
    assert result["ttft_ms"]["mean"] > 0 and result["tpot_ms"]["median"] > 0 and result["itl_ms"]["p99"] > 0
    assert json.loads(out.read_text())["completed"] == 6


# ---- shutdown (last: it stops the module's server) -------------------------------------------------------


def test_sigterm_stops_every_stage(server):
    stages = child_pids(server.proc.pid)
    assert len(stages) >= 2 and all(alive(p) for p in stages)
    assert server.stop() is not None
    deadline = time.monotonic() + 10
    while any(alive(p) for p in stages) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in stages)
