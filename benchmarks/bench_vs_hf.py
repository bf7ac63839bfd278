"""Compare `pipeserve bench throughput` with HF transformers `generate` on the embedded default model.

Both engines load SmolLM2-135M-Instruct from the same GGUF file, in the same dtype, with the same
thread count, and decode the same random prompts (all of length --input-len, so no padding) greedily
to exactly --output-len tokens, all --batch-size prompts at once. Each measurement runs in a fresh
subprocess so torch thread settings and memory cannot leak between engines; runs alternate
HF/pipeserve for --repeats rounds per dtype, and the table reports each engine's median.

    python benchmarks/bench_vs_hf.py --dtypes float32,bfloat16 --markdown bench_vs_hf.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from typing import Any

RESULT_MARKER = "BENCH_VS_HF_RESULT "  # prefix of the one stdout line a worker reports on; engines may print too


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per run (pipeserve: also max_num_seqs)")
    p.add_argument("--repeats", type=int, default=2, help="alternating HF/pipeserve rounds per dtype")
    p.add_argument("--threads", type=int, default=1, help="torch threads for each engine")
    p.add_argument("--output-json", default=None, help="write all raw measurements here")
    p.add_argument("--markdown", default=None, help="write the table here (default: stdout)")
    # Internal: run one measurement in this process and print it as JSON.
    p.add_argument("--worker", choices=["hf", "pipeserve"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def hf_worker(dtype: str, input_len: int, output_len: int, batch: int, threads: int) -> dict[str, Any]:
    """Time one HF greedy `generate` of the whole batch, after a short warm-up."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeserve.bench.throughput import random_prompts
    from pipeserve.loader.default_model import default_model_path

    torch.set_num_threads(threads)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=getattr(torch, dtype))
    model.eval()
    # transformers may warn that GGUF weights "stay packed"; for llama they are dequantized to dense `dtype`
    # tensors (as pipeserve does). Record the parameter dtypes so a packed/quantized load would show up.
    weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    vocab = model.config.vocab_size
    ids = torch.tensor(random_prompts(batch, input_len, vocab))  # same prompts (seed 0) as pipeserve gets

    def generate(x: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        generate(ids[:1], 2)  # warm-up, like pipeserve's: one prompt, two tokens
        start = time.perf_counter()
        out = generate(ids, output_len)
        elapsed = time.perf_counter() - start
    total_out = (out.shape[1] - input_len) * out.shape[0]
    return {"elapsed_s": elapsed, "total_output_tokens": total_out, "output_tokens_per_s": total_out / elapsed,
            "vocab_size": vocab, "torch_threads": torch.get_num_threads(), "weight_dtypes": weight_dtypes}


def pipeserve_worker(dtype: str, input_len: int, output_len: int, batch: int, threads: int) -> dict[str, Any]:
    """Run `pipeserve bench throughput`'s workload (it warms up itself) with the same settings."""
    from pipeserve.bench.throughput import run_throughput

    kwargs = dict(dtype=dtype, threads_per_worker=threads, max_model_len=max(1024, input_len + output_len),
                  max_num_seqs=batch)
    with contextlib.redirect_stdout(sys.stderr):  # keep its summary line off our result channel
        r = run_throughput(None, kwargs, input_len, output_len, num_prompts=batch)
    return {k: r[k] for k in ("elapsed_s", "total_output_tokens", "output_tokens_per_s")} | {
        "vocab_size": r["engine_config"]["model"]["vocab_size"], "engine_kwargs": kwargs}


def run_worker(engine: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one engine in a fresh interpreter and return its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--dtype", dtype,
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{engine} worker ({dtype}) failed:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if not lines:
        sys.exit(f"{engine} worker ({dtype}) printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_MARKER))


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, falling back to platform data."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def reproduce_command(args: argparse.Namespace) -> str:
    """The full command line, with every setting spelled out."""
    cmd = ["python", "benchmarks/bench_vs_hf.py", "--dtypes", args.dtypes, "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    return shlex.join(cmd)


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = ["| dtype | batch | in/out tokens | HF out tok/s | pipeserve out tok/s | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {args.batch_size} | {args.input_len}/{args.output_len} | "
                     f"{r['hf_median']:.1f} | {r['pipeserve_median']:.1f} | {r['ratio']:.2f}x |")
    lines += ["", f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {version('torch')}, "
              f"transformers {version('transformers')}, {args.threads} thread(s) per engine; "
              f"median of {args.repeats} alternating round(s); ratio = pipeserve / HF.", "",
              f"Reproduce: `{reproduce_command(args)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:  # child process: one measurement, reported on stdout
        fn = hf_worker if args.worker == "hf" else pipeserve_worker
        result = fn(args.dtype, args.input_len, args.output_len, args.batch_size, args.threads)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return

    rows, raw = [], {}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        runs: dict[str, list[dict[str, Any]]] = {"hf": [], "pipeserve": []}
        for i in range(args.repeats):  # A/B/A/B so slow drifts on a shared machine hit both engines
            for engine in ("hf", "pipeserve"):
                r = run_worker(engine, dtype, args)
                runs[engine].append(r)
                print(f"[{dtype} round {i + 1}/{args.repeats}] {engine}: {r['output_tokens_per_s']:.1f} out tok/s "
                      f"({r['total_output_tokens']} tokens in {r['elapsed_s']:.2f} s)", file=sys.stderr)
        if runs["hf"][0]["vocab_size"] != runs["pipeserve"][0]["vocab_size"]:
            print(f"warning: vocab sizes differ ({runs['hf'][0]['vocab_size']} vs "
                  f"{runs['pipeserve'][0]['vocab_size']}), so the prompts differ", file=sys.stderr)
        med = {e: statistics.median(r["output_tokens_per_s"] for r in rs) for e, rs in runs.items()}
        rows.append({"dtype": dtype, "hf_median": med["hf"], "pipeserve_median": med["pipeserve"],
                     "ratio": med["pipeserve"] / med["hf"]})
        raw[dtype] = runs

    table = markdown(args, rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    else:
        print(table)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "summary": rows, "runs": raw}, f, indent=2)


if __name__ == "__main__":
    main()
