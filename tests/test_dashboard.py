"""The live dashboard on a PP=1 server running in this process (uvicorn in a thread): the key exchange (cookie,
redirect, 401s, no key in the query string on /v1), the key kept out of the log, the snapshot's contents while
requests run, and a stream opened and dropped 1,000 times leaving no task, subscriber or file descriptor behind."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from pipeserve.bench.serve import DashboardWatcher
from pipeserve.control.process import free_port
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
from pipeserve.entrypoints.openai.dashboard.auth import COOKIE, redact_query
from pipeserve.entrypoints.openai.dashboard.window import LatencyWindow, Rate
from pipeserve.entrypoints.openai.launcher import build_engine

KEY = "dash-secret-4f9a2c"
PROMPT = [(5 + 11 * i) % 300 + 3 for i in range(9)]


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(("httpx", "httpcore")):  # the test's own client logs its URLs
            self.lines.append(self.format(record))


class InProcessServer:
    """uvicorn serving the app in a thread of this process (so the test can count its tasks and fds)."""

    def __init__(self, app, port: int):
        self.app, self.url = app, f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=True,
                                log_level="info")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        httpx.get(f"{self.url}/_test/loop", timeout=10)  # records the server's event loop
        self.loop = app.state.loop

    def call(self, fn):
        """Run `fn()` in the server's event loop; its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = build_engine(EngineArgs(tiny_model, dtype="float32", max_model_len=128, num_kv_blocks=64,
                                     threads_per_worker=1))
    app = build_app(engine, ServeSettings(served_model_names=["tiny"], api_key=KEY))

    @app.get("/_test/loop")
    async def remember_loop() -> dict:
        app.state.loop = asyncio.get_running_loop()
        return {}

    capture = LogCapture()
    capture.setFormatter(logging.Formatter("%(name)s %(message)s"))
    watched = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.access", "uvicorn.error")]
    levels = [lg.level for lg in watched]
    for lg in watched:
        lg.addHandler(capture)
        lg.setLevel(logging.INFO)
    server = InProcessServer(app, free_port())
    try:
        yield server, capture, engine
    finally:
        server.stop()
        for lg, level in zip(watched, levels, strict=True):
            lg.removeHandler(capture)
            lg.setLevel(level)


def complete(url: str, n: int = 24) -> dict:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def login(url: str) -> httpx.Client:
    """A client holding the dashboard cookie, got the way a browser gets it."""
    client = httpx.Client(base_url=url, timeout=30)
    r = client.get("/dashboard", params={"api_key": KEY})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    return client


def snapshots(client: httpx.Client, until, timeout_s: float = 30.0) -> dict:
    """Read the stream until a snapshot satisfies `until`; that snapshot."""
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", "/dashboard/stream") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                snap = json.loads(line[6:])
                if until(snap):
                    return snap
            assert time.monotonic() < deadline, "no snapshot matched"
    raise AssertionError("the stream ended")


def test_key_is_exchanged_for_a_cookie_and_stripped_from_the_address(served):
    server, _, _ = served
    r = httpx.get(f"{server.url}/dashboard", params={"api_key": KEY}, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and KEY not in cookie
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")[1:]}
    assert "httponly" in attrs and attrs["samesite"].lower() == "samesite=strict" and attrs["path"] == "Path=/dashboard"
    client = httpx.Client(base_url=server.url, cookies={COOKIE: r.cookies[COOKIE]}, timeout=10)
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/dashboard.js">' in page.text and "http://" not in page.text.replace(
        "http://www.w3.org", "")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200 and "EventSource" in script.text
    # a bearer header works too (curl), and the browser's own way again
    assert httpx.get(f"{server.url}/dashboard", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert login(server.url).get("/dashboard").status_code == 200


def test_without_the_key_nothing_is_served(served):
    server, _, _ = served
    url = server.url
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/stream"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code == 401 and "<html" not in r.text and "EventSource" not in r.text, path
        forged = httpx.get(url + path, cookies={COOKIE: "0" * 32 + "." + "0" * 64}, timeout=10)
        assert forged.status_code == 401, path
    assert httpx.get(f"{url}/dashboard", params={"api_key": "wrong"}, timeout=10).status_code == 401
    # the key in the query string is for the dashboard only: /v1 wants the header
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", params={"api_key": KEY}, json=body, timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", params={"api_key": KEY}, timeout=10).status_code == 401
    # nor does the dashboard's cookie open /v1
    cookies = login(url).cookies
    assert httpx.get(f"{url}/v1/models", cookies=cookies, timeout=10).status_code == 401


def test_the_key_never_reaches_the_log(served):
    server, capture, _ = served
    before = len(capture.lines)
    login(server.url).get("/dashboard")
    httpx.get(f"{server.url}/dashboard", params={"api_key": KEY + "x"}, timeout=10)
    httpx.get(f"{server.url}/v1/models", params={"api_key": KEY}, timeout=10)
    time.sleep(0.2)
    lines = capture.lines[before:]
    assert any("/dashboard?api_key=REDACTED" in line for line in lines), lines  # the access log did log them
    assert not [line for line in capture.lines if KEY in line]
    assert redact_query("/dashboard?x=1&api_key=abc&y=2") == "/dashboard?x=1&api_key=REDACTED&y=2"


def test_snapshot_shows_the_layout_and_the_live_pipeline(served):
    server, _, engine = served
    client = login(server.url)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            complete(server.url)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(load) for _ in range(2)]
        try:
            snap = snapshots(client, lambda s: s["stages"][0]["busy"] > 0 and s["stages"][0]["steps"]
                             and s["output_tokens_per_s"] > 0 and s["ttft_ms"]["p50"] is not None
                             and s["tpot_ms"]["p99"] is not None)
        finally:
            stop.set()
            for f in futures:
                f.result()
    lay = snap["layout"]
    assert lay["model"] == "tiny" and lay["pp"] == 1 and lay["tp"] == 1 and lay["dtype"] == "float32"
    assert lay["quantization"] == "none" and lay["kv"]["blocks_per_ve"] == 64 and lay["kv"]["virtual_engines"] == 1
    assert lay["stages"] == [{"stage": 0, "layers": [0, engine.config.model.num_hidden_layers],
                              "extras": ["embedding", "final norm", "LM head"]}]
    assert snap["state"] == "running" and snap["events"] == [] and snap["restarts"] == {"0": 0}
    (ve,) = snap["ves"]
    assert ve["kv_total"] == 64 and ve["kv_used"] + ve["kv_free"] == 64
    assert 0 < snap["stages"][0]["busy"] <= 1
    ago, dur_ms, vei, kind, tokens = snap["stages"][0]["steps"][-1]
    assert 0 <= ago <= snap["gantt_window_s"] and dur_ms > 0 and vei == 0 and kind in ("prefill", "decode", "mixed")
    assert tokens > 0
    assert snap["ttft_ms"]["p50"] <= snap["ttft_ms"]["p99"] and snap["tpot_ms"]["p50"] <= snap["tpot_ms"]["p99"]


def _leftovers(server: InProcessServer, engine) -> dict[str, int]:
    hub = server.app.state.dashboard_hub
    return {
        "tasks": server.call(lambda: len(asyncio.all_tasks())),
        "subscribers": len(hub.subscribers),
        "producer": int(hub._task is not None),
        "feed_watchers": int(engine.executor.step_feed.watching),
        "stage_feed": int(engine.executor.worker.feed is not None),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def test_opening_and_dropping_the_stream_leaves_nothing_behind(served):
    server, _, engine = served
    client = login(server.url)
    cookies = client.cookies
    client.close()
    time.sleep(0.5)
    before = _leftovers(server, engine)
    assert before["subscribers"] == before["producer"] == before["feed_watchers"] == before["stage_feed"] == 0
    with httpx.Client(base_url=server.url, cookies=cookies, timeout=10,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(1000):
            with client.stream("GET", "/dashboard/stream") as resp:
                assert resp.status_code == 200
                if i % 10 == 0:  # every tenth waits for a snapshot; the rest drop at once
                    next(line for line in resp.iter_lines() if line.startswith("data: "))
                else:
                    next(resp.iter_raw())
    deadline = time.monotonic() + 15

    def settled(after: dict) -> bool:  # (other tests' idle keep-alive connections may close meanwhile: <=)
        return all(after[k] <= before[k] for k in before)

    after = _leftovers(server, engine)
    while not settled(after) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _leftovers(server, engine)
    assert settled(after), f"{before} -> {after}"


def test_latency_window_forgets_the_minute_before():
    w = LatencyWindow(horizon_s=60)
    for i in range(100):
        w.add(i / 1000, now=1000.0 + i * 0.1)
    assert w.percentiles(now=1010.0) == [0.049, 0.098]
    assert w.percentiles(now=1075.0) == [None, None] and len(w) == 0


def test_without_an_api_key_the_page_is_open(served):
    _, _, engine = served
    client = TestClient(build_app(engine, ServeSettings(served_model_names=["tiny"])))  # no lifespan: no loops
    page = client.get("/dashboard")
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert client.get("/dashboard/dashboard.js").status_code == 200


def test_bench_serve_watcher_reads_the_stream_with_the_bearer_header(served):
    server, _, _ = served

    async def watch() -> dict:
        watcher = await DashboardWatcher.open(server.url, {"Authorization": f"Bearer {KEY}"})
        await asyncio.sleep(1.0)
        return await watcher.close()

    got = asyncio.run(watch())
    assert got["snapshots"] >= 2 and got["bytes"] > 100
    with pytest.raises(ValueError, match="HTTP 401"):
        asyncio.run(DashboardWatcher.open(server.url, {}))


def test_token_rate_covers_the_last_seconds_only():
    rate = Rate(span_s=3.0)
    assert rate.update(0, now=10.0) == 0.0
    assert rate.update(50, now=11.0) == 50.0
    assert rate.update(150, now=12.0) == 75.0
    assert rate.update(450, now=14.0) == pytest.approx(400 / 3)  # from 11.0, the newest sample 3 s old or more
    assert rate.update(460, now=100.0) == 0.0  # not read since: no rate from a stale sample
    assert rate.update(470, now=101.0) == 10.0
