"""What an open dashboard costs: `pipeserve bench serve` against one `pipeserve serve -pp 2`, alternating runs
without and with the dashboard's stream open (`--watch-dashboard`: the stages send their step records and the
server builds a snapshot about three times a second), and optionally against a server run from another checkout
(`--baseline-src PATH`, e.g. a worktree of the previous revision: the cost of the dashboard's code with no page
open). The servers start once and stay up; the variants take turns `--rounds` times, so a slow spell of the
machine falls on every variant; the table gives each variant's median and its ratio to this checkout without a
page.

    python benchmarks/bench_dashboard.py --rounds 5 --markdown results/dashboard.md
    python benchmarks/bench_dashboard.py --rounds 5 --baseline-src /path/to/previous/checkout
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_serving import stop_server, wait_healthy
from common import add_workload_flags, run_to_json, write_report

from pipeserve.control.process import free_port

HERE = Path(__file__).resolve().parent.parent


def start_server(src: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`pipeserve serve` with the package imported from `src` (a checkout's root)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = [args.model] if args.model else []
    cmd = [sys.executable, "-m", "pipeserve.entrypoints.launch", "serve", *model, "--port", str(port),
           "-pp", str(args.pp), "--threads-per-worker", "1", "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.num_prompts), "--disable-access-log"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    server = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_healthy(url, server)
    return server, url


def bench(url: str, args: argparse.Namespace, watch: bool, num_prompts: int | None = None) -> dict:
    argv = ["bench", "serve", "--base-url", url, "--input-len", str(args.input_len), "--output-len",
            str(args.output_len), "--num-prompts", str(num_prompts or args.num_prompts), "--vocab-size",
            str(args.vocab_size)]
    return run_to_json(argv + (["--watch-dashboard"] if watch else []))


def _median(runs: list[dict], key: str, stat: str) -> float:
    return statistics.median(r[key][stat] for r in runs)


def _snapshots(runs: list[dict]) -> str:
    """Snapshots read per second, and their average size."""
    per_s = statistics.median(r["dashboard_events"]["snapshots"] / r["duration_s"] for r in runs)
    size = statistics.median(r["dashboard_events"]["bytes"] / max(1, r["dashboard_events"]["snapshots"]) for r in runs)
    return f"{per_s:.1f}, {size / 1024:.1f} KiB"


def table(runs: dict[str, list[dict]], args: argparse.Namespace) -> str:
    ref = statistics.median(r["output_throughput"] for r in runs["no page"])
    rows = ["| variant | runs | out tok/s (median) | vs no page | TTFT p50 (ms) | TPOT p50 (ms) | ITL p99 (ms) | "
            "snapshots/s, size |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        tput = statistics.median(r["output_throughput"] for r in rs)
        snaps = _snapshots(rs) if "dashboard_events" in rs[0] else ""
        rows.append(f"| {name} | {len(rs)} | {tput:.1f} | {tput / ref:.3f}x | {_median(rs, 'ttft_ms', 'median'):.0f} | "
                    f"{_median(rs, 'tpot_ms', 'median'):.1f} | {_median(rs, 'itl_ms', 'p99'):.1f} | {snaps} |")
    spread = {name: f"{min(r['output_throughput'] for r in rs):.1f}-{max(r['output_throughput'] for r in rs):.1f}"
              for name, rs in runs.items()}
    head = (f"Workload: `pipeserve serve -pp {args.pp}` ({args.model or 'the embedded model'}), {args.num_prompts} "
            f"requests of {args.input_len} random tokens, {args.output_len} output tokens, all at once; one torch "
            f"thread per stage process; variants alternated {args.rounds} times.")
    return "\n".join([head, "", *rows, "", "output tok/s range per variant: " +
                      ", ".join(f"{k} {v}" for k, v in spread.items()), "",
                      f"command: `python benchmarks/bench_dashboard.py {' '.join(sys.argv[1:])}`"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p, num_prompts=16)
    p.set_defaults(input_len=128, output_len=64)
    p.add_argument("--model", default=None, help="model to serve (default: the embedded one)")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=49152, help="random prompt ids are drawn below this")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="another checkout's root: its server without a page is measured too")
    args = p.parse_args()
    servers = {"this": start_server(HERE, args)}
    try:
        if args.baseline_src:
            servers["baseline"] = start_server(args.baseline_src.resolve(), args)
        for _, url in servers.values():  # warm every server up (first steps allocate); discarded
            bench(url, args, watch=False, num_prompts=4)
        variants = [("no page", "this", False), ("page open", "this", True)]
        if args.baseline_src:
            variants.insert(0, ("baseline, no page", "baseline", False))
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]  # neither variant always goes first
            for name, server, watch in order:
                runs[name].append(bench(servers[server][1], args, watch))
                print(f"round {rnd + 1}/{args.rounds} {name}: {runs[name][-1]['output_throughput']:.1f} tok/s",
                      file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    raw = {name: [{k: v for k, v in r.items() if k != "per_request"} for r in rs] for name, rs in runs.items()}
    write_report(table(runs, args), args.markdown, args.output_json, raw)


if __name__ == "__main__":
    main()
