"""The dashboard in a real browser (headless Chromium over WebDriver) against `pipeserve serve -pp 2 --api-key`:
the key is exchanged and leaves the address bar, both stages show a non-zero busy figure, Gantt bars appear and
move while requests stream, a killed stage's recovery is marked on the page (and its bars come back), and the
key never reaches the server's log. Set PIPESERVE_DASHBOARD_SCREENSHOT=path to keep a screenshot."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import rank_pid, tiny_with_tokenizer
from server_utils import start_server
from webdriver import CHROMEDRIVER, CHROMIUM, Browser

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]

KEY = "browser-key-7d1e"

READ_PAGE = """
const busy = [0, 1].map((s) => { const e = document.getElementById(`busy-${s}`);
                                  return e ? parseFloat(e.textContent) : null; });
const bars = {};  // a step (stage and start time) -> its bar's x
for (const r of document.querySelectorAll("#gantt rect.step")) {
  bars[`${r.dataset.stage}@${r.dataset.start}`] = parseFloat(r.getAttribute("x"));
}
const rows = [0, 1].map((s) => document.querySelectorAll(`#gantt rect.step[data-stage="${s}"]`).length);
return {busy, bars, rows,
        state: document.getElementById("state").textContent,
        tpot: document.getElementById("tpot").textContent,
        facts: document.getElementById("facts").textContent,
        events: [...document.querySelectorAll("#event-list li.recovery")].map((e) => e.textContent),
        restarts: [0, 1].map((s) => { const e = document.querySelector(`#stage-${s} .restarts`);
                                      return e ? e.textContent : null; }),
        marks: document.querySelectorAll("#gantt rect.recovery-mark").length};
"""


def serve_args() -> list[str]:
    return ["-pp", "2", "--threads-per-worker", "1", "--dtype", "float32", "--max-model-len", "256",
            "--num-kv-blocks", "256", "--served-model-name", "tiny"]


class Load:
    """Streaming completions from a few threads until stopped."""

    def __init__(self, url: str, threads: int = 4):
        self.url, self.stop = url, threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        body = {"model": "tiny", "prompt": f"Story {i}: once upon a time", "max_tokens": 64, "temperature": 0,
                "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        while not self.stop.is_set():
            try:
                with httpx.stream("POST", f"{self.url}/v1/completions", json=body, headers=headers,
                                  timeout=120) as resp:
                    for _ in resp.iter_lines():
                        pass
            except httpx.HTTPError:
                time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def wait_page(browser: Browser, cond, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        page = browser.run(READ_PAGE)
        if cond(page):
            return page
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed it: {json.dumps(page)[:2000]}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_with_tokenizer(tmp_path_factory)
    log = tmp_path_factory.mktemp("dash") / "server.log"
    server = start_server(model, log, serve_args(), api_key=KEY)
    load = Load(server.url)
    browser = None
    try:
        browser = Browser()
        yield server, browser
    finally:
        if browser is not None:
            browser.close()
        load.close()
        server.stop()
        assert KEY not in server.log_text()  # the access log was on: it saw /dashboard?api_key=REDACTED


def test_page_shows_both_stages_busy_and_moving_gantt_bars(setup):
    server, browser = setup
    browser.get(f"{server.url}/dashboard?api_key={KEY}")
    assert browser.url == f"{server.url}/dashboard"  # the key left the address bar
    page = wait_page(browser, lambda p: all(b is not None and b > 0 for b in p["busy"]) and all(p["rows"]))
    assert page["state"] == "running" and "PP=2 × TP=1" in page["facts"] and "float32" in page["facts"]
    first = page["bars"]

    def moved_left(p: dict) -> bool:  # the same steps, drawn further left as time passes
        same = [k for k in p["bars"] if k in first]
        return bool(same) and all(p["bars"][k] < first[k] for k in same)

    later = wait_page(browser, moved_left, timeout_s=10)
    assert set(later["bars"]) - set(first)  # and new steps appeared
    log = server.log_text()
    assert "/dashboard?api_key=REDACTED" in log and KEY not in log


def test_a_killed_stage_is_marked_as_a_recovery(setup):
    server, browser = setup
    wait_page(browser, lambda p: all(p["rows"]))
    os.kill(rank_pid(server.proc.pid, 1), signal.SIGKILL)
    page = wait_page(browser, lambda p: any("recovery of stage 1" in e for e in p["events"]), timeout_s=60)
    assert page["restarts"] == ["0", "1"]
    # the page keeps working: the replacement's steps come back (it was told to send them when it joined)
    wait_page(browser, lambda p: p["state"] == "running" and all(b > 0 for b in p["busy"]) and all(p["rows"]),
              timeout_s=60)
    shot = os.environ.get("PIPESERVE_DASHBOARD_SCREENSHOT")
    if shot:  # the recovery's band still inside the Gantt's window, the replacement's steps beside it
        browser.screenshot(Path(shot))
