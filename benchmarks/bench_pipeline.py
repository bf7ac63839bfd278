"""Pipeline-parallel throughput on this machine: the seed workload scaled down, as ratios measured in one run.

Each configuration is one `pipeserve bench throughput` process (so nothing leaks between them); the
configurations alternate for --repeats rounds and the table reports medians and ratios:

  PP=2 vs PP=1 (one thread per stage process: the like-for-like speedup on two cores)
  PP=2 with 2 virtual engines vs 1 virtual engine
  PP=2 cost-balanced partition vs even partition
  PP=2 with one thread per stage vs PP=1 with two threads (the same two cores)
  PP=2 vs two independent PP=1 engines at once, each with half the prompts ("dp2"): what this machine
    gives any two busy processes, the ceiling for PP=2 here (shared caches, memory bandwidth, clocks)

    python benchmarks/bench_pipeline.py --markdown results/pipeline.md --trace results/pp2_trace.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from common import add_workload_flags, busy_cell, run_to_json, write_report

CONFIGS = {  # name -> extra `pipeserve bench throughput` flags
    "pp1": ["-pp", "1", "--threads-per-worker", "1"],
    "pp2": ["-pp", "2", "--threads-per-worker", "1"],
    "pp2_1ve": ["-pp", "2", "--threads-per-worker", "1", "--num-virtual-engines", "1"],
    "pp2_even": ["-pp", "2", "--threads-per-worker", "1", "--pp-layer-partition", "even"],
    "pp2_decode_balanced": ["-pp", "2", "--threads-per-worker", "1", "--pp-layer-partition", "balanced:1"],
    "pp1_2threads": ["-pp", "1", "--threads-per-worker", "2"],
    # the schedule before chunked pipeline prefill: one step in flight per virtual engine
    "pp2_1_in_flight": ["-pp", "2", "--threads-per-worker", "1", "--max-steps-in-flight-per-ve", "1"],
    # more micro-batches than stages: three virtual engines, so three decode steps in flight
    "pp2_3ve": ["-pp", "2", "--threads-per-worker", "1", "--num-virtual-engines", "3"],
    # two PP=1 engines side by side, half the prompts each (see run_data_parallel)
    "dp2": ["-pp", "1", "--threads-per-worker", "1"],
    # the stages as Ray actors on a local one-machine Ray cluster the engine starts
    "pp2_ray": ["-pp", "2", "--threads-per-worker", "1", "--distributed-executor-backend", "ray"],
}
DATA_PARALLEL = {"dp2": 2}  # configuration -> how many independent engines share the prompts
COMPARISONS = [  # (label, numerator, denominator)
    ("PP=2 vs PP=1 (1 thread per stage)", "pp2", "pp1"),
    ("PP=2: 2 virtual engines vs 1", "pp2", "pp2_1ve"),
    ("PP=2: cost-balanced vs even partition", "pp2", "pp2_even"),
    ("PP=2: balanced for this mix vs balanced for pure decode", "pp2", "pp2_decode_balanced"),
    ("PP=2: balanced for pure decode vs even", "pp2_decode_balanced", "pp2_even"),
    ("PP=2 (1 thread x 2 stages) vs PP=1 (2 threads)", "pp2", "pp1_2threads"),
    ("PP=2: a VE's prefill chunks in flight together vs one step per VE", "pp2", "pp2_1_in_flight"),
    ("PP=2: 3 virtual engines vs 2", "pp2_3ve", "pp2"),
    ("two independent PP=1 engines vs one (the machine's ceiling for two processes)", "dp2", "pp1"),
    ("PP=2 vs that ceiling", "pp2", "dp2"),
    ("PP=2: Ray actors vs pipeserve's own processes", "pp2_ray", "pp2"),
]


def bench_argv(name: str, args: argparse.Namespace, num_prompts: int) -> list[str]:
    return ["bench", "throughput", *CONFIGS[name], "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--num-prompts", str(num_prompts),
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(num_prompts), "--dtype", args.dtype]


def run_config(name: str, args: argparse.Namespace, trace: str | None) -> dict:
    print("running", name, flush=True, file=sys.stderr)
    if name in DATA_PARALLEL:
        return run_data_parallel(name, args)
    return run_to_json(bench_argv(name, args, args.num_prompts) + (["--trace-file", trace] if trace else []))


def run_data_parallel(name: str, args: argparse.Namespace) -> dict:
    """Several independent engines at once, the prompts split between them; their summed throughput.

    Each engine times its own run after loading; both load the same model at the same moment, so the
    timed windows overlap to within the spread of load times (reported as `start_spread_s`)."""
    n = DATA_PARALLEL[name]
    with ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(lambda _: run_to_json(bench_argv(name, args, args.num_prompts // n)), range(n)))
    ends = [p["wall_end"] for p in parts]
    starts = [e - p["elapsed_s"] for e, p in zip(ends, parts, strict=True)]
    return {
        "output_tokens_per_s": sum(p["output_tokens_per_s"] for p in parts),
        "stage_busy_fraction": [b for p in parts for b in p["stage_busy_fraction"]],
        "pipeline_bubble_fraction": 0.0,
        "start_spread_s": max(starts) - min(starts),
        "parts": parts,
    }


def cpu_per_step(runs: list[dict], key: str) -> str:
    """Median CPU milliseconds per pipeline step over the runs, as a table cell ("-" where not measured)."""
    per_step = [1e3 * r[key] / r["num_steps"] for r in runs if r.get(key) is not None and r.get("num_steps")]
    return f"{statistics.median(per_step):.2f}" if per_step else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p, num_prompts=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    p.add_argument("--trace", default=None, help="also write the last PP=2 run's trace (JSON + PNG) here")
    args = p.parse_args()
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:  # alternate configurations so drift in machine load hits all of them alike
            trace = args.trace if (name == "pp2" and r == args.repeats - 1) else None
            runs[name].append(run_config(name, args, trace))
    median = {n: statistics.median(x["output_tokens_per_s"] for x in rs) for n, rs in runs.items()}
    lines = [
        f"Workload: {args.num_prompts} prompts of {args.input_len} random tokens, {args.output_len} output tokens "
        f"each, max model len {args.max_model_len}, dtype {args.dtype}; median of {args.repeats} alternating runs.",
        "",
        "| configuration | output tok/s | per run | stage busy | bubble | engine CPU ms/step | machine CPU ms/step |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for n, rs in runs.items():
        last = rs[-1]
        busy = busy_cell(last["stage_busy_fraction"])
        per_run = ", ".join(f"{x['output_tokens_per_s']:.1f}" for x in rs)
        lines.append(f"| {n} ({' '.join(CONFIGS[n])}) | {median[n]:.1f} | {per_run} | {busy} | "
                     f"{last['pipeline_bubble_fraction']:.0%} | {cpu_per_step(rs, 'engine_process_cpu_s')} | "
                     f"{cpu_per_step(rs, 'machine_cpu_s')} |")
    lines += ["", "| comparison | ratio |", "|---|---:|"]
    for label, a, b in COMPARISONS:
        if a in median and b in median:
            lines.append(f"| {label} | {median[a] / median[b]:.2f}x |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"command: `python benchmarks/bench_pipeline.py {' '.join(sys.argv[1:])}`"]
    write_report("\n".join(lines), args.markdown, args.output_json, runs)


if __name__ == "__main__":
    main()
