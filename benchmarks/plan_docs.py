"""Regenerate the `pipeserve plan` outputs quoted in docs/planning.md and the README's reference-case lines
from the command itself, so they never drift from the model (tests/test_plan_docs.py checks they are current).

A quoted output sits between `<!-- plan: ARGS -->` and `<!-- /plan -->`; the README's lines between
`<!-- plan-reference -->` and `<!-- /plan-reference -->` are written from the two reference plans.

    python benchmarks/plan_docs.py          # rewrite the files
    python benchmarks/plan_docs.py --check  # exit 1 where a file is stale
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PLANNING, README = os.path.join(ROOT, "docs", "planning.md"), os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"<!-- plan: (?P<args>.*?) -->\n.*?<!-- /plan -->", re.S)
REFERENCE = re.compile(r"<!-- plan-reference -->\n.*?<!-- /plan-reference -->", re.S)
GPU_TABLE = re.compile(r"<!-- plan-gpu -->\n.*?<!-- /plan-gpu -->", re.S)
GPU_MD = os.path.join(ROOT, "results", "gpu.md")
# results/gpu.md's shapes as the planner's built-in ones; bench_gpu.py runs them at max_model_len 1024
GPU_SHAPES = {"1B": "llama-3.2-1b", "8B": "llama-3-8b"}
GPU_ROW = re.compile(r"^\| (?P<shape>1B|8B) \| (?P<n>\d+) (?:stream|prompts), (?P<inp>\d+)(?: in)? / (?P<out>\d+)"
                     r"(?: out)? \| (?P<tok>[\d,]+) \|", re.M)
L4_70B = ("--model llama-3-70b --gpu L4 --nodes 2 --gpus-per-node 4 --intra-node pcie --inter-node-gbps 50 "
          "--input-len 1024 --output-len 128 --max-model-len 4096 --gpu-memory-utilization 0.85")
H100_405B = ("--model llama-3.1-405b --gpu H100 --nodes 2 --gpus-per-node 8 --input-len 1024 --output-len 128 "
             "--max-model-len 4096 --inter-node-gbps {gbps}")


def plan_output(args: str) -> str:
    """What `pipeserve plan ARGS` prints, run in this process (no calibration file is read: --gpu cpu plans
    in the docs would depend on the machine)."""
    from pipeserve.entrypoints.cli import build_parser

    parsed = build_parser().parse_args(["plan", *shlex.split(args)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parsed.func(parsed)
    return out.getvalue().rstrip("\n")


def plan_json(args: str) -> dict:
    import json

    return json.loads(plan_output(args + " --json"))


def _rows(args: str) -> dict[tuple[int, int], dict]:
    return {(r["tp"], r["pp"]): r for r in plan_json(args)["layouts"] if r["status"] == "ok"}


def reference_lines() -> str:
    """The README's reference cases, in numbers from the plans."""
    l4 = _rows(L4_70B)
    tp8, mixed = l4[(8, 1)], l4[(4, 2)]
    ib, eth = _rows(H100_405B.format(gbps=400)), _rows(H100_405B.format(gbps=50))
    best_ib = max(ib.values(), key=lambda r: r["output_tok_s"])
    best_eth = max(eth.values(), key=lambda r: r["output_tok_s"])
    return "\n".join([
        f"- Llama-3-70B on 2 nodes of 4 L4 (PCIe inside, 50 Gbit/s Ethernet between), 1024 in / 128 out, 4k "
        f"context, utilization 0.85: TP=4 x PP=2 {mixed['output_tok_s']:.0f} output tok/s against TP=8 "
        f"{tp8['output_tok_s']:.0f} ({mixed['output_tok_s'] / tp8['output_tok_s']:.2f}x). TP=8 decodes faster "
        f"({tp8['tpot_ms']:.0f} against {mixed['tpot_ms']:.0f} ms per output token: TP=4 x PP=2 decodes its "
        f"{mixed['concurrency']} requests in {mixed['decode_groups']} groups, as each virtual engine's "
        f"{mixed['concurrency'] // mixed['virtual_engines']} prompts end their prefill in the same chunk, and each "
        f"stage reads its {mixed['weights_gb']:.1f} GB of weights once per group), but every one of its "
        f"all-reduces crosses the Ethernet: {tp8['link_share']:.0%} of a decode step is on links, and its time to "
        f"first token is {tp8['ttft_ms']:,.0f} against {mixed['ttft_ms']:,.0f} ms.",
        f"- Llama-3.1-405B on 2 nodes of 8 H100: with InfiniBand (400 Gbit/s) TP={best_ib['tp']} x "
        f"PP={best_ib['pp']} at {best_ib['output_tok_s']:,.0f} tok/s; over 50 Gbit/s Ethernet TP={best_eth['tp']} x "
        f"PP={best_eth['pp']} at {best_eth['output_tok_s']:,.0f}, while TP=16 drops from "
        f"{ib[(16, 1)]['output_tok_s']:,.0f} to {eth[(16, 1)]['output_tok_s']:,.0f} (its all-reduces cross the "
        f"slow link, PP's hand-offs barely do).",
    ])


def gpu_table() -> str:
    """The H200 preset's predictions beside every throughput row bench_gpu.py measured in results/gpu.md."""
    with open(GPU_MD) as f:
        measured = list(GPU_ROW.finditer(f.read()))
    lines = ["| shape | workload | measured tok/s (results/gpu.md) | predicted tok/s | predicted TPOT ms | "
             "predicted / measured | bottleneck |", "|---|---|---:|---:|---:|---:|---|"]
    for m in measured:
        n, inp, out = int(m["n"]), int(m["inp"]), int(m["out"])
        args = (f"--model {GPU_SHAPES[m['shape']]} --gpu H200 --input-len {inp} --output-len {out} "
                f"--max-model-len 1024 --concurrency {n}")
        (row,) = _rows(args).values()
        tok = float(m["tok"].replace(",", ""))
        lines.append(f"| {m['shape']} | {n} x {inp} in / {out} out | {tok:,.0f} | {row['output_tok_s']:,.0f} | "
                     f"{row['tpot_ms']:.2f} | {row['output_tok_s'] / tok:.2f} | {row['bottleneck']} |")
    return "\n".join(lines)


def regenerate(text: str) -> str:
    def block(m: re.Match) -> str:
        args = m.group("args")
        return f"<!-- plan: {args} -->\n```\n$ pipeserve plan {args}\n{plan_output(args)}\n```\n<!-- /plan -->"

    text = GPU_TABLE.sub(lambda _: f"<!-- plan-gpu -->\n{gpu_table()}\n<!-- /plan-gpu -->", text)
    return BLOCK.sub(block, text)


def regenerate_readme(text: str) -> str:
    return REFERENCE.sub(lambda _: f"<!-- plan-reference -->\n{reference_lines()}\n<!-- /plan-reference -->", text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    stale = []
    for path, fn in ((PLANNING, regenerate), (README, regenerate_readme)):
        with open(path) as f:
            old = f.read()
        new = fn(old)
        if new != old:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check and stale:
        sys.exit(f"stale plan outputs in {', '.join(stale)}: run python benchmarks/plan_docs.py")
    print(("stale: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))


if __name__ == "__main__":
    main()
