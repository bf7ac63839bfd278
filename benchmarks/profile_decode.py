"""Where one user's decode step spends its time: torch.profiler over single-stream decode, by category.

The embedded SmolLM2 GGUF in this process (PP=1), one 128-token prompt. One request of 1 + N tokens is
profiled; the model runner's step ranges mark where prefill ends, so the table covers the N decode steps.
Operator self-times are grouped into categories; "outside operators" is the wall time no operator
accounts for: Python in the model, the scheduler, sampling bookkeeping and detokenizing.

    python benchmarks/profile_decode.py --quantization auto --markdown results/decode_profile.md
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

CATEGORIES = {  # operator -> category; anything unlisted is "other operators"
    "quantized matmul kernels": ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm",
                                 "aten::_weight_int8pack_mm"),
    "dense matmuls": ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear"),
    "attention (KV write, gather, scores)": (
        "aten::index_copy_", "aten::index_select", "aten::bmm", "aten::baddbmm", "aten::_softmax",
        "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "casts, copies, allocations": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::empty",
                                   "aten::empty_strided", "aten::cat", "aten::clone", "aten::contiguous"),
    "norms, rotary, activations, residuals": (
        "aten::rms_norm", "aten::_fused_rms_norm", "aten::mul", "aten::add", "aten::silu", "aten::pow",
        "aten::mean", "aten::sum", "aten::div_", "aten::rsqrt", "aten::neg", "aten::roll", "aten::add_",
        "aten::mul_"),
    "views (no data moved)": ("aten::as_strided", "aten::view", "aten::slice", "aten::select",
                              "aten::narrow", "aten::transpose", "aten::reshape", "aten::unsqueeze",
                              "aten::expand", "aten::_reshape_alias", "aten::t"),
}
PROMPT = [(i * 7919) % 40000 + 100 for i in range(128)]


def decode_profile(llm, sampling_params, steps: int) -> tuple[float, dict[str, float], dict[str, int]]:
    """(wall ms, self ms per operator, calls per operator) per decode step of one request of 1 + `steps` tokens.

    The model runner marks each step with a `pipeserve::<kind>_step` range: operators count from the end of
    the prefill step on, and the wall time is from there to the end of the request."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([{"prompt_token_ids": PROMPT}], sampling_params(1 + steps))
    events = prof.events()
    prefill_end = max(e.time_range.end for e in events if e.name == "pipeserve::prefill_step")
    last = max(e.time_range.end for e in events)
    self_ms, calls = collections.defaultdict(float), collections.defaultdict(int)
    for e in events:
        if e.time_range.start >= prefill_end and not e.name.startswith("pipeserve::"):
            self_ms[e.name] += e.self_cpu_time_total / 1e3 / steps
            calls[e.name] += 1
    return (last - prefill_end) / 1e3 / steps, self_ms, {k: v / steps for k, v in calls.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantization", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    p.add_argument("--markdown", default=None)
    args = p.parse_args()

    from pipeserve import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(dtype=args.dtype, quantization=args.quantization, threads_per_worker=args.threads, max_model_len=512)

    def params(n: int):
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    llm.generate([{"prompt_token_ids": PROMPT}], params(4))  # warm-up
    # Unprofiled first: the profiler's own cost per operator would inflate the wall time per token.
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": PROMPT}], params(1))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": PROMPT}], params(1 + args.steps))
    plain_ms = (time.perf_counter() - start - prefill) / args.steps * 1e3

    wall_ms, per_step, calls = decode_profile(llm, params, args.steps)
    llm.shutdown()

    lookup = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
    by_cat, ops_by_cat = collections.defaultdict(float), collections.defaultdict(float)
    for op, ms in per_step.items():
        cat = lookup.get(op, "other operators")
        by_cat[cat] += ms
        ops_by_cat[cat] += calls[op]
    by_cat["outside operators (Python, scheduler, engine)"] = wall_ms - sum(per_step.values())

    lines = [f"Decode step breakdown: `--quantization {args.quantization}`, {args.dtype}, {args.threads} thread(s), "
             f"{args.steps} steps; {plain_ms:.1f} ms per token unprofiled, {wall_ms:.1f} ms profiled",
             "", "| category | ms per token | share | operator calls per token |", "|---|---:|---:|---:|"]
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        n = ops_by_cat.get(cat)
        lines.append(f"| {cat} | {ms:.2f} | {100 * ms / wall_ms:.0f}% | {'' if n is None else f'{n:.0f}'} |")
    lines += ["", "| operator | ms per token | calls per token |", "|---|---:|---:|"]
    for op, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| `{op}` | {ms:.2f} | {calls[op]:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
