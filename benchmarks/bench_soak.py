"""Soak: a `pipeserve serve` driven for many requests, as an operator's server runs for weeks.

Requests are short and mixed (prompts of 8-300 tokens, a quarter of them sharing a system-prompt-like prefix
so the prefix cache fills and evicts; 1-32 output tokens), sent at a fixed concurrency. A third are
streams, and half of those hang up after the first chunk (the server must abort them and free everything).

Every --sample-every requests the client pauses until nothing is in flight, then samples: the resident
memory of the server process and of every stage process, KV blocks in use (must be 0) and the latency
of the requests since the last sample. The first --warmup requests only warm up (enough to touch the whole
KV pool); growth is the slope of a least-squares line through the samples after it, per 10,000 requests
and as a share of the memory at the end of warm-up.

    python benchmarks/bench_soak.py --requests 20000 --json results/soak.json --png results/soak.png

The embedded model serves about 3 of these requests a second on 2 cores, so a run of 20,000 takes hours
here; `--random-model` serves a random-weight Llama with the embedded model's vocabulary (so logits and
other per-step tensors have its sizes, from KiB to MiB, which is what the allocator sees) and 4 narrow
layers, about ten times faster. Extra `pipeserve serve` flags go after `--`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from bench_serving import stop_server, wait_healthy
from common import CLI

from pipeserve.control.process import free_port


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, name) of every process (from /proc)."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        table[int(entry)] = (int(stat[stat.rfind(")") + 2:].split()[1]), name)
    return table


def stage_pids(server: int) -> dict[str, int]:
    """The server's stage processes by name (`pipeserve-r0`, ...): its descendants so named, or with the Ray
    backend (whose raylet starts the actors) every `ray::_RankActor` on this machine."""
    table = processes()

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = table.get(pid, (0, ""))[0]
            if pid == server:
                return True
        return False

    found = {name: pid for pid, (_, name) in table.items() if name.startswith("pipeserve-r") and descends(pid)}
    actors = sorted(pid for pid, (_, name) in table.items() if name.startswith("ray::_RankActor"))
    return found or {f"ray-actor-{i}": pid for i, pid in enumerate(actors)}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


class Workload:
    """The request mix, reproducible from a seed."""

    def __init__(self, seed: int, vocab: int = 49152):
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.prefix = [self.rng.randrange(100, vocab) for _ in range(96)]

    def next(self) -> tuple[dict, str]:
        """A request body and how the client reads it: "whole", "stream" or "hang_up"."""
        r = self.rng
        tokens = [r.randrange(100, self.vocab) for _ in range(r.randint(8, 200))]
        if r.random() < 0.25:
            tokens = self.prefix + tokens
        body = {"prompt": tokens, "max_tokens": r.randint(1, 32), "temperature": r.choice([0.0, 0.8]),
                "ignore_eos": True}
        kind = r.choices(["whole", "stream", "hang_up"], [4, 1, 1])[0]
        if kind != "whole":
            body["stream"] = True
        return body, kind


async def one(client: httpx.AsyncClient, url: str, model: str, body: dict, kind: str) -> float:
    """Send one request; its latency in seconds (to the first chunk for a client that hangs up)."""
    start = time.perf_counter()
    body = {**body, "model": model}
    if kind == "whole":
        r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if kind == "hang_up" and line.startswith("data: "):
                return time.perf_counter() - start  # leaving the block closes the connection mid-stream
    return time.perf_counter() - start


async def drive(url: str, args: argparse.Namespace) -> list[dict]:
    work, samples, served = Workload(args.seed), [], 0
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        samples.append(sample(url, served, []))
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(body: dict, kind: str) -> float:
            async with sem:
                return await one(client, url, model, body, kind)

        while served < args.requests:
            batch = [work.next() for _ in range(min(args.sample_every, args.requests - served))]
            latencies = await asyncio.gather(*(limited(b, k) for b, k in batch))
            served += len(batch)
            await asyncio.sleep(args.settle_s)  # aborts of hung-up streams and the stages' releases land
            samples.append(sample(url, served, latencies))
            s = samples[-1]
            print(f"{served:>7} served  rss MB " + "  ".join(f"{k} {v:.0f}" for k, v in s["rss_mb"].items())
                  + f"  kv used {s['kv_blocks_used']:.0f}  p99 {s['p99_s']:.2f} s", file=sys.stderr, flush=True)
    return samples


def sample(url: str, served: int, latencies: list[float]) -> dict:
    rss = {"server": rss_mb(SERVER_PID[0])}
    rss.update({name: rss_mb(pid) for name, pid in sorted(stage_pids(SERVER_PID[0]).items())})
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"served": served, "time": time.time(), "rss_mb": rss,
            "kv_blocks_used": metric(url, "pipeserve_kv_blocks_used"),
            "p50_s": q[49], "p99_s": q[98], "latencies_s": latencies}


SERVER_PID = [0]
RANDOM_MODEL = dict(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def write_random_model(folder: str) -> str:
    """A random-weight Llama of RANDOM_MODEL's shape, saved as safetensors (pipeserve's real loading path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**RANDOM_MODEL)).save_pretrained(folder, safe_serialization=True)
    return folder


def growth(samples: list[dict], warmup: int) -> dict[str, dict]:
    """Per process: MB per 10,000 requests after warm-up (least squares) and that as % of its warm-up RSS."""
    after = [s for s in samples if s["served"] >= warmup]
    out = {}
    for name in after[0]["rss_mb"]:
        xs = [s["served"] for s in after if name in s["rss_mb"]]
        ys = [s["rss_mb"][name] for s in after if name in s["rss_mb"]]
        if len(xs) < 2:
            continue
        slope = statistics.linear_regression(xs, ys).slope * 10_000
        out[name] = {"mb_at_warmup": ys[0], "mb_at_end": ys[-1], "mb_per_10k": slope,
                     "pct_per_10k": 100 * slope / ys[0]}
    return out


def latency_drift(samples: list[dict], warmup: int) -> dict[str, float]:
    """p99 latency of the first and last tenth of the requests after warm-up."""
    lat = [x for s in samples if s["served"] > warmup for x in s["latencies_s"]]
    tenth = max(1, len(lat) // 10)
    first, last = statistics.quantiles(lat[:tenth], n=100)[98], statistics.quantiles(lat[-tenth:], n=100)[98]
    return {"p99_first_tenth_s": first, "p99_last_tenth_s": last, "ratio": last / first}


def plot(samples: list[dict], warmup: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name in samples[-1]["rss_mb"]:
        pts = [(s["served"], s["rss_mb"][name]) for s in samples if name in s["rss_mb"]]
        mem.plot(*zip(*pts, strict=True), marker=".", label=name)
    mem.set_ylabel("resident memory (MB)")
    mem.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
    mem.legend(loc="center right")
    mem.set_title(title, fontsize=10)
    pts = [s for s in samples if s["served"] > 0]  # the first sample is taken before any request
    lat.plot([s["served"] for s in pts], [s["p50_s"] for s in pts], marker=".", label="p50")
    lat.plot([s["served"] for s in pts], [s["p99_s"] for s in pts], marker=".", label="p99")
    lat.set_ylabel("request latency (s)")
    lat.set_xlabel("requests served")
    lat.axvline(warmup, color="grey", linestyle=":")
    lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=800)
    p.add_argument("--sample-every", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--settle-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--random-model", action="store_true", help="serve a random-weight Llama (see above)")
    p.add_argument("server_args", nargs="*", help="after --: extra `pipeserve serve` flags (model, layout, backend)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="soak-model-")
    if args.random_model:
        args.server_args = [write_random_model(tmp.name), *args.server_args]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", "--port", str(port), "-pp", "2", "--num-kv-blocks", "512", "--max-model-len", "2048",
             "--threads-per-worker", "1", *args.server_args]
    server = subprocess.Popen(CLI + serve, stdout=sys.stderr, stderr=sys.stderr)
    SERVER_PID[0] = server.pid
    try:
        wait_healthy(url, server)
        started = time.time()
        samples = asyncio.run(drive(url, args))
    finally:
        stop_server(server)
        tmp.cleanup()
    report = {"command": "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]), "serve_args": serve[2:],
              "duration_s": time.time() - started, "growth_after_warmup": growth(samples, args.warmup),
              "latency": latency_drift(samples, args.warmup),
              "kv_blocks_used_at_samples": sorted({s["kv_blocks_used"] for s in samples}), "samples": samples}
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:  # per-request latencies are summarized per sample; the file keeps the summaries
        kept = [{k: v for k, v in s.items() if k != "latencies_s"} | {"requests": len(s["latencies_s"])}
                for s in samples]
        with open(args.json, "w") as f:
            json.dump({**report, "samples": kept}, f, indent=1)
    if args.png:
        model = "a random-weight model" if args.random_model else " ".join(args.server_args) or "the embedded model"
        plot(samples, args.warmup, args.png, f"{args.requests} requests to pipeserve serve -pp 2 ({model}); "
                                             f"after {args.warmup} to warm up, sampled every {args.sample_every}")


if __name__ == "__main__":
    main()
