"""Time to first token of one long prompt: does it use every pipeline stage at once?

One prompt of 8000 tokens (the embedded SmolLM2 allows 8192 positions), 1 token out, chunked at
`max_num_batched_tokens` (512: 16 chunks), one thread per stage, float32. A virtual engine keeps up to
`--max-steps-in-flight-per-ve` steps in flight (default: one per stage), so chunk k+1 enters stage 0 while
chunk k is in stage 1. Compared in one run, configurations alternated, each in a fresh process, best of
two timed requests after a warm-up: PP=1, PP=2, PP=3, and PP=2 with one step in flight per VE (the
schedule before chunked pipeline prefill). `--trace` writes the step timeline of the PP=2 run (and a PNG).

    python benchmarks/bench_long_prompt.py --markdown results/long_prompt.md --output-json results/long_prompt.json \
        --trace results/long_prompt_pp2_trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from common import WORKER_RESULT

RESULT = WORKER_RESULT  # the line run_worker reads
CONFIGS = {  # name -> (pipeline size, steps in flight per VE; None = default, one per stage)
    "PP=1": (1, None),
    "PP=2": (2, None),
    "PP=3": (3, None),
    "PP=2, 1 step in flight per VE": (2, 1),
}


def worker(pp: int, in_flight: int | None, prompt_len: int, trace: str | None) -> dict[str, Any]:
    from pipeserve import LLM, SamplingParams

    prompt = [(i * 7919) % 40000 + 100 for i in range(prompt_len)]
    llm = LLM(dtype="float32", pipeline_parallel_size=pp, threads_per_worker=1, max_model_len=8192,
              max_steps_in_flight_per_ve=in_flight, trace_file=trace)
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([{"prompt_token_ids": prompt[:600]}], one)  # warm-up: two chunks through every stage
    times = []
    for _ in range(2):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], one)
        times.append(time.perf_counter() - start)
    llm.shutdown()
    return {"ttft_s": min(times), "runs_s": times}


def run(*args: str) -> dict[str, Any]:
    from common import run_worker

    return run_worker(__file__, *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=2, help="times each configuration runs, alternated")
    p.add_argument("--trace", default=None, help="step timeline of the (first) PP=2 run")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        pp, in_flight, prompt_len, trace = args.worker
        result = worker(int(pp), None if in_flight == "-" else int(in_flight), int(prompt_len),
                        None if trace == "-" else trace)
        print(RESULT + json.dumps(result), flush=True)
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_report

    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, (pp, in_flight) in CONFIGS.items():
            trace = args.trace if (name == "PP=2" and round_ == 0 and args.trace) else "-"
            print(f"round {round_ + 1}: {name}", file=sys.stderr)
            out = run(str(pp), "-" if in_flight is None else str(in_flight), str(args.prompt_len), trace)
            results[name].append(out["ttft_s"])
    base = min(results["PP=1"])
    lines = [f"Time to first token, one prompt of {args.prompt_len} tokens (chunks of 512), one thread per stage, "
             f"float32; best of {2 * args.rounds} requests over {args.rounds} alternated rounds",
             "", "| configuration | TTFT (s) | vs PP=1 | every round (s) |", "|---|---:|---:|---|"]
    for name, ttfts in results.items():
        lines.append(f"| {name} | {min(ttfts):.2f} | {min(ttfts) / base:.2f}x | "
                     f"{' / '.join(f'{t:.2f}' for t in ttfts)} |")
    write_report("\n".join(lines), args.markdown, args.output_json,
                 {"prompt_len": args.prompt_len, "ttft_s": results})


if __name__ == "__main__":
    main()
