"""One user's token latency against llama.cpp on the same GGUF file, and batched throughput with its MFU.

Single stream: one 128-token prompt, 128 greedy tokens out, at 1 and 2 threads. llama.cpp (llama-cpp-python,
its own environment: `make bench-llamacpp` builds it) runs the file as stored (Q4_1, Q8_0 head); pipeserve
runs it with `--quantization auto` (4-bit kernels for steps of few rows) and `none` (dense), in float32 and
bfloat16. Prefill is the time of a 1-token request (the whole prompt in one step); decode is the time of 128
further steps. Engines alternate, each measurement in a fresh process, best of two runs inside it.

Batched: 32 streams, 128 in / 128 out, 2 threads, in the dtype `auto` picks here (bfloat16 where the CPU
has bf16 units, else float32: without them torch's bf16 GEMM is a scalar loop at ~1 GFLOP/s), pipeserve
`auto` against `none` and HF `generate` on dense weights, with model FLOP utilization: computed tokens x 2 x
matmul parameters per token, over wall time, over this machine's GEMM peak in that dtype, same run.

    make bench-llamacpp        # or: python benchmarks/bench_vs_llamacpp.py --llamacpp-python PY
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from common import WORKER_RESULT

RESULT = WORKER_RESULT  # the line run_worker reads
PROMPT = [(i * 7919) % 40000 + 100 for i in range(128)]  # fixed, tokenizer-independent ids
OUTPUT_LEN = 128
FLOP_PER_TOKEN = 2 * 134.5e6  # SmolLM2-135M: 2 x matmul parameters (LM head included), attention aside


def llamacpp_worker(path: str, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama  # only in the benchmark environment

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
    best_prefill = best_decode = 0.0
    for _ in range(2):
        llm.reset()
        start = time.perf_counter()
        llm.eval(PROMPT)
        best_prefill = max(best_prefill, len(PROMPT) / (time.perf_counter() - start))
        stamps = []
        for _tok in llm.generate(PROMPT[-1:], temp=0.0, reset=False):  # one eval of one token per step
            stamps.append(time.perf_counter())
            if len(stamps) > OUTPUT_LEN:
                break
        best_decode = max(best_decode, OUTPUT_LEN / (stamps[-1] - stamps[0]))
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


def pipeserve_worker(quantization: str, dtype: str, threads: int) -> dict[str, Any]:
    from pipeserve import LLM, SamplingParams

    llm = LLM(dtype=dtype, quantization=quantization, threads_per_worker=threads, max_model_len=512)

    def timed(n: int) -> float:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - start

    timed(2)  # warm-up
    best_prefill = best_decode = 0.0
    for _ in range(2):
        one, full = timed(1), timed(OUTPUT_LEN + 1)
        best_prefill = max(best_prefill, len(PROMPT) / one)
        best_decode = max(best_decode, OUTPUT_LEN / (full - one))
    llm.shutdown()
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


def batched_worker(quantization: str, dtype: str, threads: int) -> dict[str, Any]:
    from pipeserve.bench.throughput import run_throughput

    kwargs = dict(dtype=dtype, quantization=quantization, threads_per_worker=threads, max_model_len=512,
                  max_num_seqs=32)
    with contextlib.redirect_stdout(sys.stderr):
        r = run_throughput(None, kwargs, 128, 128, num_prompts=32)
    return {k: r[k] for k in ("elapsed_s", "total_output_tokens", "output_tokens_per_s")}


def gemm_peak_worker(dtype: str, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    a, b = (torch.randn(1024, 1024, dtype=getattr(torch, dtype)) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * 1024**3 / (time.perf_counter() - start))
    return {"gflop_s": best / 1e9}


def run(python: str, *args: str) -> dict[str, Any]:
    from common import run_worker

    return run_worker(__file__, *args, python=python)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llamacpp-python", required="--worker" not in sys.argv,
                   help="python of the environment that has llama-cpp-python")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    p.add_argument("--reuse-single", default=None, help="take the single-stream results from this JSON")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"llamacpp": llamacpp_worker, "pipeserve": pipeserve_worker, "batched": batched_worker,
              "gemm": gemm_peak_worker, "hf": hf_batched_worker}[kind]
        rest = [int(x) if x.isdigit() else x for x in rest]
        print(RESULT + json.dumps(fn(*rest)), flush=True)
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_report

    from pipeserve.config import resolve_dtype
    from pipeserve.loader.default_model import default_model_path

    path, me = default_model_path(), sys.executable
    dtype = resolve_dtype("auto")
    single: dict[str, dict[str, Any]] = {}
    if args.reuse_single:
        with open(args.reuse_single) as f:
            single = json.load(f)["single"]
    for threads in () if single else (1, 2):
        for name, cmd in [("llama.cpp (Q4_1 as stored)", (args.llamacpp_python, "llamacpp", path, str(threads))),
                          ("pipeserve auto, float32", (me, "pipeserve", "auto", "float32", str(threads))),
                          ("pipeserve none, float32", (me, "pipeserve", "none", "float32", str(threads))),
                          ("pipeserve auto, bfloat16", (me, "pipeserve", "auto", "bfloat16", str(threads))),
                          ("pipeserve none, bfloat16", (me, "pipeserve", "none", "bfloat16", str(threads)))]:
            print(f"single stream, {threads} thread(s): {name}", file=sys.stderr)
            single[f"{name}|{threads}"] = run(cmd[0], *cmd[1:])
    batched = {name: run(me, *cmd) for name, cmd in [
        (f"pipeserve auto, {dtype}", ("batched", "auto", dtype, "2")),
        (f"pipeserve none, {dtype}", ("batched", "none", dtype, "2")),
        (f"HF generate, {dtype}", ("hf", dtype, "2"))]}
    peak = run(me, "gemm", dtype, "2")["gflop_s"]
    write_report(report(single, batched, peak, dtype), args.markdown, args.output_json,
                 {"single": single, "batched": batched, "batched_dtype": dtype, "gemm_peak_gflop_s_2_threads": peak})


def hf_batched_worker(dtype: str, threads: int) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_vs_hf import hf_worker

    with contextlib.redirect_stdout(sys.stderr):
        return hf_worker(dtype, 128, 128, 32, threads)


def report(single: dict[str, dict[str, Any]], batched: dict[str, dict[str, Any]], peak: float, dtype: str) -> str:
    lines = ["| engine | threads | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, r in single.items():
        name, threads = key.split("|")
        ref = single[f"llama.cpp (Q4_1 as stored)|{threads}"]
        lines.append(f"| {name} | {threads} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / ref['decode_tok_s']:.2f}x"
                     f" | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x |")
    lines += ["", "| 32 streams, 128 in / 128 out, 2 threads | output tok/s | vs HF | MFU |", "|---|---:|---:|---:|"]
    hf = batched[f"HF generate, {dtype}"]["output_tokens_per_s"]
    for name, r in batched.items():
        computed = r["total_output_tokens"] * 2  # every stream computes 128 prompt + 128 generated tokens
        mfu = computed * FLOP_PER_TOKEN / r["elapsed_s"] / (peak * 1e9)
        lines.append(f"| {name} | {r['output_tokens_per_s']:.0f} | {r['output_tokens_per_s'] / hf:.2f}x | {mfu:.0%} |")
    lines.append(f"\n{dtype} GEMM peak measured in the same run (1024^3, 2 threads): {peak:.0f} GFLOP/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
