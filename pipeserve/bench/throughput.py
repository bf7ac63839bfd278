"""`pipeserve bench throughput`: random-token prompts of exact length, forced to exact output length."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch

from pipeserve import LLM, SamplingParams
from pipeserve.timeline import bubble_fraction, busy_fractions, stage_records


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`num` prompts of exactly `length` token ids, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the low ids, where tokenizers keep their special tokens.
    return torch.randint(100, vocab_size, (num, length), generator=g).tolist()


def machine_busy_cpu_s() -> float | None:
    """CPU seconds every process on this machine has used since boot (Linux's /proc/stat), or None elsewhere.

    The difference over a run counts what no per-process figure shows: stage processes, and the daemons of
    an executor backend (Ray's raylet, GCS and agents) that run beside the engine."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # guest time is already counted in user time
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def run_throughput(model: str | None, engine_kwargs: dict[str, Any], input_len: int, output_len: int,
                   num_prompts: int, output_json: str | None = None) -> dict[str, Any]:
    """Run the workload once after a short warm-up; print a summary and return (and optionally save) it."""
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    with LLM(model, **{**engine_kwargs, "record_steps": True}) as llm:  # busy fractions come from the records
        prompts = random_prompts(num_prompts, input_len, llm.config.model.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        sent_before = [s["bytes_sent"] for s in llm.engine.executor.collect_stats()]
        machine_start = machine_busy_cpu_s()
        wall_start, start, cpu_start = time.time(), time.perf_counter(), time.process_time()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        elapsed, engine_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        machine_end = machine_busy_cpu_s()
        config = llm.config
        stats = llm.engine.executor.collect_stats()
        records = stage_records(stats)
    sent = [s["bytes_sent"] - b for s, b in zip(stats, sent_before, strict=True)]  # per rank, timed run only
    busy = busy_fractions(records, config.parallel.pipeline_parallel_size, wall_start, wall_start + elapsed)
    num_steps = len({(r.virtual_engine, r.step_id) for r in records if r.start >= wall_start})
    total_out = sum(len(o.outputs[0].token_ids) for o in outs)
    total_in = num_prompts * input_len
    result = {
        "elapsed_s": elapsed,
        "wall_end": wall_start + elapsed,  # lets a caller line up runs of several engines at once
        "num_requests": num_prompts,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "requests_per_s": num_prompts / elapsed,
        "output_tokens_per_s": total_out / elapsed,
        "total_tokens_per_s": (total_in + total_out) / elapsed,
        "stage_busy_fraction": busy,
        # CPU seconds of the engine's own process during the run (at PP=1 that process also runs the model)
        "engine_process_cpu_s": engine_cpu,
        "machine_cpu_s": None if machine_start is None else machine_end - machine_start,
        "pipeline_bubble_fraction": bubble_fraction(busy),
        "num_steps": num_steps,
        "rank_bytes_sent": sent,  # activations each rank sent to the next stage
        "stage_handoff_bytes_per_step": sum(sent) / max(1, num_steps),
        # each rank's weights and KV pool (tensor bytes) and its resident memory, now and at peak
        "rank_memory": [{k: s.get(k, 0) for k in ("rank", "stage", "tp_rank", "weights_bytes", "kv_bytes",
                                                   "rss_bytes", "peak_rss_bytes")} for s in stats],
        "engine_config": _config_dict(config),
    }
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['output_tokens_per_s']:.1f} output "
          f"tokens/s, {result['total_tokens_per_s']:.1f} total tokens/s ({num_prompts} requests of {input_len} "
          f"in + {output_len} out, {elapsed:.1f} s)")
    print("Memory: " + ", ".join(f"rank {m['rank']} weights {m['weights_bytes'] / 2**20:.0f} MiB + KV "
                                 f"{m['kv_bytes'] / 2**20:.0f} MiB, peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB"
                                 for m in result["rank_memory"]))
    print("Stage busy: " + ", ".join(f"stage {i} {b:.1%}" for i, b in enumerate(busy))
          + f"; pipeline bubble {result['pipeline_bubble_fraction']:.1%}")
    if output_json:
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _config_dict(config) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["model"]["dtype"] = config.model.dtype
    return d
