"""Serving benchmark: `pipeserve serve` with PP=1 and PP=2 on the embedded model, measured in one run.

For each layout a server starts on a free port (one torch thread per stage process), `pipeserve bench
serve` streams --num-prompts requests at it (all at once unless --request-rate), and the server stops.
The table reports throughput and TTFT / TPOT / ITL / end-to-end latency (vLLM benchmark_serving's
definitions) and the PP=2 / PP=1 ratios.

    python benchmarks/bench_serving.py --markdown results/serving.md
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request

from common import CLI, add_workload_flags, run_to_json, write_report

from pipeserve.control.process import free_port


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"server at {url} not healthy after {timeout_s} s")


def measure(pp: int, args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(CLI + ["serve", "--port", str(port), "-pp", str(pp), "--threads-per-worker", "1",
                                     "--max-model-len", str(args.max_model_len), "--max-num-seqs",
                                     str(args.num_prompts)], stdout=sys.stderr, stderr=sys.stderr)
    try:
        wait_healthy(url, server)
        rate = [] if args.request_rate is None else ["--request-rate", str(args.request_rate)]
        return run_to_json(["bench", "serve", "--base-url", url, "--input-len", str(args.input_len),
                            "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
                            "--vocab-size", "49152", *rate])
    finally:
        stop_server(server)


def stop_server(server: subprocess.Popen, timeout_s: float = 60) -> None:
    """Stop a `pipeserve serve` as an operator would (SIGINT), killing it if it does not exit in time."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()


def table(results: dict[int, dict], args: argparse.Namespace) -> str:
    rows = ["| layout | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
            "E2E p50 (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for pp, r in results.items():
        rows.append(f"| PP={pp} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
                    f"{r['ttft_ms']['median']:.0f} / {r['ttft_ms']['p99']:.0f} | "
                    f"{r['tpot_ms']['median']:.0f} / {r['tpot_ms']['p99']:.0f} | "
                    f"{r['itl_ms']['median']:.0f} / {r['itl_ms']['p99']:.0f} | {r['e2el_ms']['median'] / 1e3:.1f} |")
    a, b = results.get(2), results.get(1)
    if a and b:
        rows += ["", f"PP=2 / PP=1: output throughput {a['output_throughput'] / b['output_throughput']:.2f}x, "
                     f"median TTFT {a['ttft_ms']['median'] / b['ttft_ms']['median']:.2f}x, "
                     f"median TPOT {a['tpot_ms']['median'] / b['tpot_ms']['median']:.2f}x"]
    head = (f"Workload: {args.num_prompts} requests of {args.input_len} random tokens, {args.output_len} output "
            f"tokens, request rate {args.request_rate or 'inf'}; one thread per stage process.")
    return "\n".join([head, "", *rows, "", f"command: `python benchmarks/bench_serving.py {' '.join(sys.argv[1:])}`"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p, num_prompts=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--request-rate", type=float, default=None)
    args = p.parse_args()
    results = {pp: measure(pp, args) for pp in (1, 2)}
    raw = {f"pp{pp}": {k: v for k, v in r.items() if k != "per_request"} for pp, r in results.items()}
    write_report(table(results, args), args.markdown, args.output_json, raw)


if __name__ == "__main__":
    main()
