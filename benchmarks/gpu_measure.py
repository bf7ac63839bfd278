"""Measurements for bench_gpu.py: the device's copy bandwidth and GEMM rate, pipeserve's workloads with their
step timings and kernel counts, and HF transformers' `generate` on the same weights."""

from __future__ import annotations

import gc
import glob
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from pipeserve import LLM, SamplingParams
from pipeserve.timeline import stage_records
from pipeserve.worker.gpu_timeline import idle_fraction


@dataclass
class Workload:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    hf_output_len: int | None = None  # None: HF skips it (too slow to fit the run); else HF's capped length
    compare_async: bool = False  # also run with --no-async-scheduling, for the async-vs-sync table


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, reps=10)


def gemm_rate(device: str, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of one square n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, reps=10)


def prompts_for(w: Workload, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (w.num_prompts, w.input_len), generator=g).tolist()


def steady_step_s(records, batch: int, since: float) -> float | None:
    """Median wall time from one decode step's start to the next's, over consecutive steps of `batch` decodes
    (every request decoding) that began after `since`."""
    steps = sorted((r for r in records if r.start >= since and r.kind == "decode" and r.num_tokens == batch),
                   key=lambda r: (r.virtual_engine, r.step_id))
    gaps = [b.start - a.start for a, b in zip(steps, steps[1:], strict=False)
            if b.step_id == a.step_id + 1 and b.virtual_engine == a.virtual_engine]
    return statistics.median(gaps) if gaps else None


def run_pipeserve(path: str, workloads: list[Workload], engine_kwargs: dict, vocab: int,
                  step_batches: tuple[int, ...], kernel_steps: tuple[int, int]) -> dict:
    """Every workload on one engine: tok/s and the steady decode step at each batch in `step_batches`."""
    started = time.perf_counter()
    with LLM(path, record_steps=True, enable_prefix_caching=False, seed=0, **engine_kwargs) as llm:
        out: dict = {"load_s": time.perf_counter() - started, "workloads": {}, "step_s": {}}
        stats = llm.engine.executor.collect_stats()[0]
        out["graphs"] = {k: stats[k] for k in ("cuda_graph_capture_s", "cuda_graph_memory_bytes", "cuda_graph_count")
                         if k in stats}
        for i, w in enumerate(workloads):
            prompts = [{"prompt_token_ids": p} for p in prompts_for(w, vocab, seed=i)]
            warm_up(llm, prompts)
            params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
            spans_before = len(gpu_spans(llm))
            sync(engine_kwargs["device"])
            since, start = time.time(), time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            out["workloads"][w.name] = {"elapsed_s": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed,
                                        "gpu_idle_between_decodes": _idle(gpu_spans(llm)[spans_before:])}
            if w.num_prompts in step_batches:
                records = stage_records(llm.engine.executor.collect_stats())
                out["step_s"][w.num_prompts] = steady_step_s(records, w.num_prompts, since)
        out["kernels_per_decode_step"] = kernels_per_decode_step(llm, engine_kwargs["device"], *kernel_steps)
        out["gpu_idle_kernels"] = gpu_idle_kernels(llm, engine_kwargs["device"], kernel_steps[1])
        out["planned_ahead"] = sum(s.num_planned_ahead for s in llm.engine.stats())
        stats = llm.engine.executor.collect_stats()[0]
        out["graphs"]["cuda_graph_replays"] = stats.get("cuda_graph_replays")
    release(engine_kwargs["device"])
    return out


WARM_UP_TOKENS = 4


def warm_up(llm, prompts: list[dict]) -> None:
    """An untimed run of the workload's prompts for a few tokens: the prefill and decode shapes it meets
    (kernel compiles, allocator growth, first-use costs) are paid before it is timed."""
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=WARM_UP_TOKENS, ignore_eos=True))


def gpu_spans(llm) -> list:
    """Every kept step's span on the GPU (worker/gpu_timeline.py); empty where steps are not timed on one."""
    return llm.engine.executor.collect_stats()[0].get("gpu_spans", [])


def _idle(spans: list) -> float | None:
    return idle_fraction(spans) if spans else None


def kernels_per_decode_step(llm, device: str, short: int, long: int) -> dict:
    """Device kernels (CPU operators where there is no GPU) per decode step of one request: the difference
    between a request of 1 + `long` and one of 1 + `short` tokens, over the `long - short` extra steps."""
    counts = []
    for n in (short, long):
        activity = ProfilerActivity.CUDA if device.startswith("cuda") else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            llm.generate([{"prompt_token_ids": [7] * 32}], SamplingParams(temperature=0.0, max_tokens=1 + n,
                                                                          ignore_eos=True))
            sync(device)
        counts.append(_count_kernels(prof.events(), device))
    return {"what": "CUDA kernels" if device.startswith("cuda") else "CPU operators",
            "per_step": (counts[1] - counts[0]) / (long - short)}


def gpu_idle_kernels(llm, device: str, steps: int) -> float | None:
    """One stream of `steps` greedy decode steps under the profiler: the share of the time from its first GPU
    kernel or copy to its last during which none ran. Unlike the CUDA events around each step, this also sees
    the GPU waiting inside a step for the host to issue its work. None without CUDA."""
    if not device.startswith("cuda"):
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([{"prompt_token_ids": [7] * 8}], SamplingParams(temperature=0.0, max_tokens=1 + steps,
                                                                     ignore_eos=True))
        sync(device)
    return idle_share([(e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA])


def idle_share(intervals: list[tuple[float, float]]) -> float | None:
    """The share of [first start, last end] covered by none of the intervals."""
    if not intervals:
        return None
    spans = sorted(intervals)
    first, busy = spans[0][0], 0.0
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    total = max(end for _, end in spans) - first
    return 1.0 - busy / total if total > 0 else None


def _count_kernels(events, device: str) -> int:
    if device.startswith("cuda"):
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    return sum(1 for e in events if e.name.startswith("aten::")  # operators not called by another operator
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def load_hf(path: str, device: str, dtype: torch.dtype):
    """HF's LlamaForCausalLM on `device` with the checkpoint's weights, read straight onto the device."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(path)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    state = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state |= load_file(file, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(m != "lm_head.weight" for m in missing):  # a tied head has no tensor of its own
        raise RuntimeError(f"checkpoint and HF model disagree: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()  # whatever dtype construction chose, HF computes in the engine's


def run_hf(path: str, workloads: list[Workload], device: str, dtype: torch.dtype, vocab: int) -> dict:
    """HF `generate`, greedy and eager, on the workloads it runs (at their capped output length)."""
    todo = [(i, w) for i, w in enumerate(workloads) if w.hf_output_len]
    if not todo:
        return {}
    model = load_hf(path, device, dtype)
    out = {}
    with torch.no_grad():
        model.generate(torch.full((1, 8), 5, device=device), max_new_tokens=2, do_sample=False, pad_token_id=0)
        for i, w in todo:
            ids = torch.tensor(prompts_for(w, vocab, seed=i), device=device)  # (B, input_len)
            sync(device)
            start = time.perf_counter()
            gen = model.generate(ids, max_new_tokens=w.hf_output_len, min_new_tokens=w.hf_output_len,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            sync(device)
            elapsed = time.perf_counter() - start
            tokens = (gen.shape[1] - w.input_len) * w.num_prompts
            out[w.name] = {"elapsed_s": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed,
                           "output_len": w.hf_output_len}
    del model
    release(device)
    return out
