"""`pipeserve bench serve`: load an OpenAI-compatible server with streamed completions and time every token.

Any server that speaks /v1/completions with SSE streaming works (pipeserve, vLLM, ...). Prompts are random
token ids (exactly L tokens) or random text decoded from them; each asks for O tokens with `ignore_eos`.
Metrics follow vLLM's benchmark_serving: TTFT = arrival of the first streamed chunk; TPOT = (e2e - TTFT) /
(output tokens - 1) per request; ITL = every gap between successive chunks; all as mean, median and p99.
`--watch-dashboard` keeps pipeserve's live dashboard stream (/dashboard/stream) open and read for the whole
run, as an open page would: what watching costs (benchmarks/bench_dashboard.py compares both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """What one streamed request measured (seconds)."""

    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclass
class BenchConfig:
    """The workload and where to send it."""

    base_url: str
    model: str | None
    input_len: int
    output_len: int
    num_prompts: int
    request_rate: float = math.inf
    max_concurrency: int | None = None
    prompt_format: str = "ids"
    tokenizer: str | None = None
    vocab_size: int = 32000
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int = 0
    watch_dashboard: bool = False


def add_bench_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="streamed-completion load test of an OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (with ignore_eos)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="token-id prompts (exact length) or random text decoded with --tokenizer")
    p.add_argument("--tokenizer", default=None, help="HF folder, .gguf or model alias (for --prompt-format text)")
    p.add_argument("--vocab-size", type=int, default=32000, help="random ids are drawn from [100, this)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that reject it)")
    p.add_argument("--api-key", default=os.environ.get("PIPESERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--watch-dashboard", action="store_true",
                   help="keep pipeserve's /dashboard/stream open during the run, as an open page does")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    keys = set(BenchConfig.__dataclass_fields__)
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in keys})
    run_bench_serve(cfg, args.output_json)


def run_bench_serve(cfg: BenchConfig, output_json: str | None = None) -> dict[str, Any]:
    """Run the workload once (after one short check request); print and return the summary."""
    _check_config(cfg)
    result = asyncio.run(_benchmark(cfg))
    print_summary(result)
    if output_json:
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _check_config(cfg: BenchConfig) -> None:
    for name in ("input_len", "output_len", "num_prompts"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {cfg.request_rate}")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {cfg.max_concurrency}")
    if cfg.prompt_format == "text" and not cfg.tokenizer:
        raise ValueError("--prompt-format text needs --tokenizer to make prompts of the asked length")


def make_prompts(cfg: BenchConfig) -> list[str | list[int]]:
    """`num_prompts` prompts of `input_len` random token ids (or the text they decode to)."""
    rng = random.Random(cfg.seed)
    if cfg.prompt_format == "ids":
        return [[rng.randrange(100, cfg.vocab_size) for _ in range(cfg.input_len)] for _ in range(cfg.num_prompts)]
    from pipeserve.loader.default_model import resolve_model_path
    from pipeserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model_path(cfg.tokenizer))
    if tok is None:
        raise ValueError(f"{cfg.tokenizer!r} has no tokenizer")
    vocab = min(cfg.vocab_size, len(tok))
    prompts = []
    for _ in range(cfg.num_prompts):
        ids = [rng.randrange(100, vocab) for _ in range(cfg.input_len)]
        # Decoding then encoding can merge or split tokens; trim to the asked length where it grew.
        prompts.append(tok.decode(tok.encode(tok.decode(ids), add_special_tokens=False)[: cfg.input_len]))
    return prompts


async def _benchmark(cfg: BenchConfig) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = cfg.max_concurrency or cfg.num_prompts
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None, connect=30.0)) as client:
        model = cfg.model or await _first_model(client)
        prompts = make_prompts(cfg)
        check = await stream_completion(client, _payload(cfg, model, prompts[0], 2))
        if not check.ok:
            raise ValueError(f"the check request failed: {check.error}")
        watcher = await DashboardWatcher.open(cfg.base_url, headers) if cfg.watch_dashboard else None
        start = time.perf_counter()
        try:
            results = await _run_all(cfg, client, model, prompts)
            duration = time.perf_counter() - start
        finally:
            events = await watcher.close() if watcher is not None else None
    summary = summarize(cfg, model, results, duration)
    if events is not None:
        summary["dashboard_events"] = events
    return summary


class DashboardWatcher:
    """Reads /dashboard/stream in the background, as an open dashboard page does; counts its snapshots."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0  # of the snapshots' JSON
        self.first = asyncio.Event()
        self.task: asyncio.Task | None = None

    @classmethod
    async def open(cls, base_url: str, headers: dict[str, str]) -> DashboardWatcher:
        """Returns once the first snapshot has arrived (the stages' step feed is on from then)."""
        watcher = cls()
        watcher.task = asyncio.create_task(watcher._read(base_url, headers))
        done, _ = await asyncio.wait([watcher.task, asyncio.create_task(watcher.first.wait())],
                                     timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if watcher.task in done or not watcher.first.is_set():
            exc = watcher.task.exception() if watcher.task.done() else None
            watcher.task.cancel()
            raise ValueError(f"cannot open {base_url}/dashboard/stream: {exc or 'no snapshot within 30 s'}")
        return watcher

    async def _read(self, base_url: str, headers: dict[str, str]) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(None, connect=30)) as c:
            async with c.stream("GET", "/dashboard/stream") as resp:
                if resp.status_code != 200:
                    raise ValueError(f"HTTP {resp.status_code}")
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        self.events += 1
                        self.bytes += len(line) - len("data:")
                        self.first.set()

    async def close(self) -> dict[str, int]:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return {"snapshots": self.events, "bytes": self.bytes}


async def _first_model(client: Any) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def _payload(cfg: BenchConfig, model: str, prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def _run_all(cfg: BenchConfig, client: Any, model: str, prompts: list) -> list[RequestResult]:
    rng = random.Random(cfg.seed + 1)
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def one(prompt: str | list[int]) -> RequestResult:
        if gate is None:
            return await stream_completion(client, _payload(cfg, model, prompt, cfg.output_len))
        async with gate:
            return await stream_completion(client, _payload(cfg, model, prompt, cfg.output_len))

    tasks = []
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(cfg.request_rate):
            await asyncio.sleep(rng.expovariate(cfg.request_rate))  # Poisson arrivals
        tasks.append(asyncio.create_task(one(prompt)))
    return list(await asyncio.gather(*tasks))


async def stream_completion(client: Any, payload: dict[str, Any]) -> RequestResult:
    """POST a streamed completion; time the first chunk and every gap after it."""
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return result
            chunks = 0
            async for line in resp.aiter_lines():
                data = line.removeprefix("data:").strip() if line.startswith("data:") else None
                if not data or data == "[DONE]":
                    continue
                body = json.loads(data)
                if "error" in body:
                    result.error = str(body["error"].get("message", body["error"]))
                    return result
                if body.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if body.get("usage"):
                    result.prompt_tokens = body["usage"].get("prompt_tokens", 0)
                    result.output_tokens = body["usage"].get("completion_tokens", 0)
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks  # servers without usage: one token per chunk
        result.ok = chunks > 0
        if not result.ok:
            result.error = "the stream carried no tokens"
    except Exception as exc:  # a benchmark reports failures; it does not stop at the first
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    pos = 0.99 * (len(ordered) - 1)  # linear interpolation between ranks, as numpy.percentile does
    lo = math.floor(pos)
    p99 = ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (pos - lo)
    return {"mean": statistics.fmean(values) * 1e3, "median": statistics.median(values) * 1e3, "p99": p99 * 1e3}


def summarize(cfg: BenchConfig, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughputs and latency statistics (milliseconds) over the completed requests."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens or cfg.input_len for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "model": model, "base_url": cfg.base_url, "duration_s": duration,
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in done]), "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([g for r in done for g in r.itl]), "e2el_ms": _stats_ms([r.e2e for r in done]),
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "per_request": [{"ttft_s": r.ttft, "e2e_s": r.e2e, "output_tokens": r.output_tokens} for r in done],
    }


def print_summary(s: dict[str, Any]) -> None:
    c = s["config"]
    print(f"Serving benchmark: {s['completed']} completed, {s['failed']} failed in {s['duration_s']:.2f} s "
          f"({c['num_prompts']} prompts of {c['input_len']} in + {c['output_len']} out, request rate "
          f"{c['request_rate']}, max concurrency {c['max_concurrency']})")
    for err in s["errors"]:
        print(f"  error: {err}")
    print(f"Request throughput: {s['request_throughput']:.2f} req/s   Output: {s['output_throughput']:.1f} tok/s   "
          f"Total: {s['total_token_throughput']:.1f} tok/s")
    if "dashboard_events" in s:
        d = s["dashboard_events"]
        print(f"Dashboard stream open throughout: {d['snapshots']} snapshots read, "
              f"{d['bytes'] / max(1, d['snapshots']) / 1024:.1f} KiB each on average")
    print(f"{'(ms)':<6}{'mean':>10}{'median':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        m = s[f"{name}_ms"]
        print(f"{name.upper():<6}{m['mean']:>10.1f}{m['median']:>10.1f}{m['p99']:>10.1f}")
