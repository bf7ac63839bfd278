"""Prefix caching on a shared-prefix workload, on vs off in one run.

Every request is one shared "system prompt" of --prefix-len random tokens plus --suffix-len tokens of its
own, and asks for --output-len tokens (ignore_eos); all arrive at once, on the embedded model at PP=2 (one
thread per stage). Each configuration runs in a fresh process (`--worker`); they alternate for --rounds.
Reported: output throughput, median and p90 time to first token (from submission), the prompt tokens the
cache supplied, and how the requests spread over the virtual engines and the stages' busy fractions (the
placement rule must keep every stage busy although every request shares one prefix).

    python benchmarks/bench_prefix_cache.py --markdown results/prefix_cache.md --output-json results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from common import WORKER_RESULT, busy_cell, run_worker, write_report

CONFIGS = {"caching on": True, "caching off": False}


def worker(args: argparse.Namespace) -> None:
    import torch

    from pipeserve import LLM, SamplingParams
    from pipeserve.bench.throughput import busy_fractions, stage_records

    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 40000, (args.prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(100, 40000, (args.suffix_len,), generator=g).tolist()
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with LLM(None, pipeline_parallel_size=args.pp, threads_per_worker=1, max_model_len=4096,
             max_num_seqs=args.num_prompts, enable_prefix_caching=args.caching == "on", record_steps=True) as llm:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2))  # warm-up, shares nothing
        first_token: dict[int, float] = {}

        def on_output(i: int, out) -> None:
            if i not in first_token and out.outputs[0].token_ids:
                first_token[i] = time.perf_counter()

        wall, start = time.time(), time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, on_output=on_output)
        elapsed = time.perf_counter() - start
        records = stage_records(llm.engine.executor.collect_stats())
        per_ve = [s.prefix_cache_queries for s in llm.engine.stats()]
    ttft = sorted(first_token[i] - start for i in range(len(prompts)))
    result = {
        "caching": args.caching, "elapsed_s": elapsed,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
        "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in outs),
        "prompt_tokens": sum(len(p) for p in prompts),
        "prompt_tokens_looked_up_per_ve": per_ve,  # (caching on) how evenly the requests spread over the VEs
        "stage_busy_fraction": busy_fractions(records, args.pp, wall, wall + elapsed),
    }
    print(WORKER_RESULT + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--caching", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    shape = ["--num-prompts", str(args.num_prompts), "--prefix-len", str(args.prefix_len), "--suffix-len",
             str(args.suffix_len), "--output-len", str(args.output_len), "--pp", str(args.pp)]
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, on in CONFIGS.items():  # alternated, so drift in machine load hits both alike
            print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_worker(__file__, "--caching", "on" if on else "off", *shape))
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("output_tokens_per_s", "ttft_median_s",
                                                                   "ttft_p90_s", "elapsed_s")}
           for name, rs in runs.items()}
    lines = [
        f"Workload: {args.num_prompts} requests, each a shared {args.prefix_len}-token prefix plus "
        f"{args.suffix_len} tokens of its own, {args.output_len} tokens out (greedy, ignore_eos), all at once; "
        f"the embedded model at PP={args.pp}, one thread per stage; median of {args.rounds} alternated rounds.",
        "",
        "| configuration | output tok/s | median TTFT (s) | p90 TTFT (s) | prompt tokens from the cache | "
        "stage busy |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rs in runs.items():
        last = rs[-1]
        busy = busy_cell(last["stage_busy_fraction"])
        lines.append(f"| {name} | {med[name]['output_tokens_per_s']:.1f} | {med[name]['ttft_median_s']:.1f} | "
                     f"{med[name]['ttft_p90_s']:.1f} | {last['cached_prompt_tokens']} of {last['prompt_tokens']} | "
                     f"{busy} |")
    on, off = med["caching on"], med["caching off"]
    lines += ["", "| comparison | ratio |", "|---|---:|",
              f"| throughput, caching on / off | {on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}x |",
              f"| median TTFT, caching on / off | {on['ttft_median_s'] / off['ttft_median_s']:.2f}x |",
              "", "Prompt tokens looked up per virtual engine, caching on (how evenly the requests spread): "
              f"{runs['caching on'][-1]['prompt_tokens_looked_up_per_ve']}",
              "", f"Machine: {platform.machine()}, {os.cpu_count()} cores; command: "
              f"`python benchmarks/bench_prefix_cache.py {' '.join(sys.argv[1:])}`"]
    write_report("\n".join(lines), args.markdown, args.output_json, runs)


if __name__ == "__main__":
    main()
