"""Scale check of model splitting: a ~1.5B-parameter Llama served at PP=1, 2 and 4, memory per stage.

The script writes a random-weight Llama (hidden 2048, 32 layers, 32 heads / 4 KV heads, intermediate 5632,
vocabulary 32000: 1.54 B parameters) as sharded bf16 safetensors with an index into a temporary folder,
deletes it afterwards, and serves it in float32 (this CPU has no bf16 units) with one thread per stage:

* memory: each stage process's peak resident memory against its share of the weights plus its KV pool
  (its pages count only once touched: the pool is allocated lazily) plus a fixed overhead (the interpreter, torch, the
  code), read from the stage processes themselves (`/proc/self/statm`, `getrusage`); at PP=4 no process
  may hold more than its stage;
* throughput: output tokens/s of a small batch at PP=1, 2 and 4 (the 2 cores of this machine run PP=4's
  four stages on two cores, so that figure shows oversubscription as much as pipelining).

    python benchmarks/bench_scale.py --markdown results/scale.md --output-json results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from common import WORKER_RESULT

RESULT = WORKER_RESULT  # the line run_worker reads
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
MIB = 1 << 20


def write_checkpoint(folder: str, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 weights in HF layout, sharded with an index; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=False, rms_norm_eps=1e-5, torch_dtype="bfloat16")
    cfg.save_pretrained(folder)
    from gpu_model import tensor_shapes  # HF Llama's checkpoint names and shapes, shared with bench_gpu

    shapes = tensor_shapes({**SHAPE, "tie_word_embeddings": False})
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    return total


def worker(path: str, pp: int, num_prompts: int, input_len: int, output_len: int) -> dict[str, Any]:
    from pipeserve import LLM, SamplingParams
    from pipeserve.bench.throughput import random_prompts

    with LLM(path, dtype="float32", pipeline_parallel_size=pp, threads_per_worker=1, max_model_len=1024,
             num_kv_blocks=256, quantization="none") as llm:
        prompts = random_prompts(num_prompts, input_len, llm.config.model.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2))  # warm-up
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        elapsed = time.perf_counter() - start
        stats = llm.engine.executor.collect_stats()
        layers = llm.config.parallel.stage_layers
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed, "stage_layers": list(layers),
            "stages": [{k: s[k] for k in ("stage", "num_params", "weights_bytes", "kv_bytes", "rss_bytes",
                                          "peak_rss_bytes")} for s in stats]}


def run(*args: str) -> dict[str, Any]:
    from common import run_worker

    return run_worker(__file__, *args)


def report(params: int, results: dict[int, dict[str, Any]], workload: str) -> str:
    lines = [f"Random-weight Llama, {params / 1e9:.2f} B parameters (bf16 checkpoint, served in float32), "
             f"one thread per stage; {workload}", "",
             "| PP | stage | layers | weights (MiB) | KV pool (MiB) | peak RSS (MiB) | peak RSS - weights - KV "
             "(MiB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for pp, res in results.items():
        for s in res["stages"]:
            rest = (s["peak_rss_bytes"] - s["weights_bytes"] - s["kv_bytes"]) / MIB
            lines.append(f"| {pp} | {s['stage']} | {res['stage_layers'][s['stage']]} | {s['weights_bytes'] / MIB:.0f} "
                         f"| {s['kv_bytes'] / MIB:.0f} | {s['peak_rss_bytes'] / MIB:.0f} | {rest:.0f} |")
    lines += ["", "| PP | output tok/s | vs PP=1 |", "|---:|---:|---:|"]
    base = results[1]["output_tokens_per_s"]
    for pp, res in results.items():
        lines.append(f"| {pp} | {res['output_tokens_per_s']:.2f} | {res['output_tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", default="1,2,4")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        path, *nums = args.worker
        print(RESULT + json.dumps(worker(path, *map(int, nums))), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_report

    folder = tempfile.mkdtemp(prefix="pipeserve-scale-")
    try:
        print(f"writing the checkpoint to {folder}", file=sys.stderr)
        params = write_checkpoint(folder)
        results = {}
        for pp in map(int, args.pp.split(",")):
            print(f"PP={pp}", file=sys.stderr)
            results[pp] = run(folder, str(pp), str(args.num_prompts), str(args.input_len), str(args.output_len))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    workload = f"{args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out"
    write_report(report(params, results, workload), args.markdown, args.output_json,
                 {"params": params, "workload": workload, "results": results})


if __name__ == "__main__":
    main()
