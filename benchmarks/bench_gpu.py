"""pipeserve against HF transformers on one GPU, and against the GPU's own limits, in one run (`make bench-gpu`).

Writes the Llama-3.2-1B and Llama-3.1-8B shapes with random bf16 weights drawn on the GPU, then per shape runs
pipeserve (one engine, every workload) and, after its memory is released, HF `generate` (eager, greedy) on the
same weights. Reports output tok/s and the ratio to HF; the steady decode step (start to start, every request
decoding) at batch 1, 8, 64 and 256; each workload's fraction of its limit (prefill FLOPs at the bf16 GEMM
rate plus, per decode step, weights and KV read at the copy bandwidth, both measured in the same run); kernels
per decode step; CUDA graph capture time and memory where the engine reports them; and the workloads marked
`compare_async` again with `--no-async-scheduling` (a second engine), with the GPU's idle share both ways.

    PYTHONPATH=. python3 benchmarks/bench_gpu.py                  # results/gpu.md and results/gpu.json
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --smoke          # tiny shape on the CPU: results/gpu_smoke.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_measure import Workload, copy_bandwidth, gemm_rate, run_hf, run_pipeserve  # noqa: E402
from gpu_model import SHAPES, write_checkpoint  # noqa: E402
from gpu_report import limits, markdown  # noqa: E402

STEP_BATCHES = (1, 8, 64, 256)


def plan(smoke: bool) -> dict[str, list[Workload]]:
    """Workloads per shape. HF runs capped output lengths where the full one would not fit five minutes
    (HF's per-token cost is flat in the output length, so its tok/s barely depends on the cap)."""
    if smoke:
        return {"tiny": [Workload("1 stream, 16 in / 8 out", 1, 16, 8, 4, True),
                         Workload("8 prompts, 16 / 8", 8, 16, 8),
                         Workload("64 prompts, 24 / 8", 64, 24, 8, 2, True)]}
    return {
        "1B": [Workload("1 stream, 128 in / 256 out", 1, 128, 256, 64, True),
               Workload("8 prompts, 128 / 64", 8, 128, 64),
               Workload("64 prompts, 512 / 128", 64, 512, 128, 64, True),
               Workload("256 prompts, 512 / 128", 256, 512, 128)],
        "8B": [Workload("1 stream, 128 in / 256 out", 1, 128, 256, 32, True),
               Workload("64 prompts, 512 / 128", 64, 512, 128, 32)],
    }


def commit_of(repo: str) -> str:
    """The commit checked out at `repo`: git if it runs, else .git/HEAD read directly, else 'unknown'."""
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    git = os.path.join(repo, ".git")
    try:
        if os.path.isfile(git):  # a worktree: .git names the real git directory
            with open(git) as f:
                git = os.path.join(repo, f.read().split("gitdir:", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head
        with open(os.path.join(git, head[5:])) as f:
            return f.read().strip()
    except (OSError, IndexError):
        return "unknown"


def engine_kwargs(args, shape_name: str) -> dict:
    if args.smoke:
        return dict(device="cpu", dtype="float32", max_model_len=64, max_num_seqs=64, max_num_batched_tokens=2048,
                    kv_cache_memory_gb=0.05, threads_per_worker=1, async_scheduling=True)
    # 256 x 640 tokens of the 1B shape need 5.2 GB of KV; 64 x 640 of the 8B shape 5.4 GB
    kwargs = dict(device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=256,
                  max_num_batched_tokens=8192, kv_cache_memory_gb=8.0, async_scheduling=True)
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


def run_shape(args, name: str, workloads: list[Workload], workdir: str, log) -> dict:
    kwargs = engine_kwargs(args, name)
    device, dtype = kwargs["device"], torch.float32 if args.smoke else torch.bfloat16
    t0 = time.perf_counter()
    path = write_checkpoint(os.path.join(workdir, name), SHAPES[name], device, dtype)
    log(f"{name}: wrote random weights in {time.perf_counter() - t0:.1f} s")
    vocab = SHAPES[name]["vocab_size"]
    kernel_steps = (2, 6) if args.smoke else (8, 24)
    ours = run_pipeserve(path, workloads, kwargs, vocab, STEP_BATCHES, kernel_steps)
    log(f"{name}: pipeserve done ({ours['load_s']:.1f} s to load): "
        + ", ".join(f"{w}: {r['tok_s']:.0f} tok/s" for w, r in ours["workloads"].items()))
    compared = [w for w in workloads if w.compare_async]
    sync_run = run_pipeserve(path, compared, {**kwargs, "async_scheduling": False}, vocab, STEP_BATCHES, kernel_steps)
    log(f"{name}: pipeserve without async scheduling done: "
        + ", ".join(f"{w}: {r['tok_s']:.0f} tok/s" for w, r in sync_run["workloads"].items()))
    hf = {} if args.no_hf else run_hf(path, workloads, device, dtype, vocab)
    log(f"{name}: HF done: " + ", ".join(f"{w}: {r['tok_s']:.0f} tok/s" for w, r in hf.items()))
    shutil.rmtree(path, ignore_errors=True)
    return {"pipeserve": ours, "pipeserve_sync": sync_run, "hf": hf, "workloads": [w.__dict__ for w in workloads]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, a few tokens: checks the script")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--copy-to", default=None, help="also copy the results here (the device tool's $OUT)")
    p.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temp dir)")
    p.add_argument("--commit", default=None, help="the commit measured (default: read from the checkout)")
    p.add_argument("--shapes", default=None, help="comma-separated subset of the shapes, e.g. 1B")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager to the engine: no CUDA graphs")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --smoke for the CPU check)")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    device = "cpu" if args.smoke else "cuda"
    peak = {"copy_bytes_per_s": copy_bandwidth(device, (64 << 20) if args.smoke else (1 << 30)),
            "gemm_flops_per_s": gemm_rate(device, 256 if args.smoke else 8192,
                                          torch.float32 if args.smoke else torch.bfloat16)}
    log(f"copy {peak['copy_bytes_per_s'] / 1e12:.2f} TB/s, GEMM {peak['gemm_flops_per_s'] / 1e12:.1f} TFLOP/s")
    shapes = plan(args.smoke)
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_gpu_")
    results = {"machine": torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)",
               "torch": torch.__version__, "commit": args.commit or commit_of(os.getcwd()), "peak": peak,
               "shapes": {}}
    for name, workloads in shapes.items():
        results["shapes"][name] = run_shape(args, name, workloads, workdir, log)
        results["shapes"][name]["limits"] = limits(SHAPES[name], 4 if args.smoke else 2, workloads,
                                                   results["shapes"][name], peak)
    results["elapsed_s"] = time.perf_counter() - start
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results(results, args)
    log("done")
    return results


def write_results(results: dict, args) -> None:
    stem = "gpu_smoke" if args.smoke else "gpu"
    text = markdown(results)
    print(text)
    for folder in filter(None, (args.results_dir, args.copy_to)):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, stem + ".md"), "w") as f:
            f.write(text)
        with open(os.path.join(folder, stem + ".json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
