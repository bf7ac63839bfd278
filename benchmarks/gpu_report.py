"""bench_gpu.py's limits (what the measured bandwidth and GEMM rate allow) and its markdown report."""

from __future__ import annotations

from gpu_measure import Workload
from gpu_model import decode_limit_s, prefill_flops


def limits(shape: dict, dtype_bytes: int, workloads: list[Workload], measured: dict, peak: dict) -> dict:
    """Per workload: the seconds its prefill needs at the GEMM rate plus the seconds its decode steps need
    at the copy bandwidth, and the share of that in the measured time; per steady batch, the step's limit."""
    bw, rate = peak["copy_bytes_per_s"], peak["gemm_flops_per_s"]
    out: dict = {"workloads": {}, "steps": {}}
    for w in workloads:
        prefill_s = prefill_flops(shape, w.num_prompts, w.input_len) / rate
        # the prefill samples the first token; decode step j then reads a context of input_len + j tokens
        contexts = [w.input_len + j for j in range(1, w.output_len)]
        decode_s = decode_limit_s(shape, dtype_bytes, w.num_prompts, contexts, bw)
        elapsed = measured["pipeserve"]["workloads"][w.name]["elapsed_s"]
        out["workloads"][w.name] = {"prefill_limit_s": prefill_s, "decode_limit_s": decode_s,
                                    "limit_tok_s": w.num_prompts * w.output_len / (prefill_s + decode_s),
                                    "fraction": (prefill_s + decode_s) / elapsed}
        if w.num_prompts in measured["pipeserve"]["step_s"]:
            step = measured["pipeserve"]["step_s"][w.num_prompts]  # None: no two consecutive pure decode steps
            mid = w.input_len + w.output_len // 2
            limit = decode_limit_s(shape, dtype_bytes, w.num_prompts, [mid], bw)
            out["steps"][w.num_prompts] = {"step_s": step, "limit_s": limit, "context": mid,
                                           "fraction": None if step is None else limit / step}
    return out


def _cell(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(results: dict) -> str:
    peak = results["peak"]
    lines = [
        "# pipeserve on one GPU against HF transformers and the device's limits",
        "",
        f"Machine: {results['machine']}, torch {results['torch']}. Commit measured: `{results['commit']}`.",
        f"Measured in the same run: device-to-device copy {peak['copy_bytes_per_s'] / 1e9:,.0f} GB/s (bytes read "
        f"+ written), GEMM {peak['gemm_flops_per_s'] / 1e12:.2f} TFLOP/s. Random weights, greedy, "
        f"`ignore_eos`, prefix caching off. Reproduce: `make bench-gpu` ({results['elapsed_s']:.0f} s).",
        "Each workload is timed in steady state: an untimed run of its prompts for a few tokens comes first. "
        "GPU idle between decode steps: over consecutive decode steps, the share of the time the GPU waited "
        "between one step's work and the next's (CUDA events around each step; one engine process, PP=1, "
        "one virtual engine).",
        "",
        "| shape | workload | pipeserve tok/s | HF tok/s (HF output len) | ratio | limit tok/s | fraction of limit "
        "| GPU idle between decode steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["shapes"].items():
        for w in r["workloads"]:
            ours = r["pipeserve"]["workloads"][w["name"]]["tok_s"]
            hf = r["hf"].get(w["name"])
            lim = r["limits"]["workloads"][w["name"]]
            hf_cell = f"{hf['tok_s']:,.0f} ({hf['output_len']})" if hf else "—"
            ratio = f"{ours / hf['tok_s']:.1f}x" if hf else "—"
            idle = r["pipeserve"]["workloads"][w["name"]].get("gpu_idle_between_decodes")
            lines.append(f"| {name} | {w['name']} | {ours:,.0f} | {hf_cell} | {ratio} | {lim['limit_tok_s']:,.0f} | "
                         f"{lim['fraction']:.1%} | {_cell(idle, '.1%')} |")
    lines += ["", "Steady decode step (start to start, every request decoding; limit: weights + KV at the "
              "workload's middle context, read at the measured bandwidth):", "",
              "| shape | batch | context | step ms | limit ms | fraction of limit |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["shapes"].items():
        for batch, s in sorted(r["limits"]["steps"].items(), key=lambda kv: int(kv[0])):
            step_ms = None if s["step_s"] is None else s["step_s"] * 1e3
            lines.append(f"| {name} | {batch} | {s['context']} | {_cell(step_ms, '.2f')} | {s['limit_s'] * 1e3:.3f} | "
                         f"{_cell(s['fraction'], '.1%')} |")
    lines += ["", "| shape | load s | kernels per decode step (batch 1) | graph capture s | graph memory MiB | "
              "graph replays |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["shapes"].items():
        ours, g = r["pipeserve"], r["pipeserve"]["graphs"]
        k = ours["kernels_per_decode_step"]
        mem = g.get("cuda_graph_memory_bytes")
        replays = g.get("cuda_graph_replays")
        lines.append(f"| {name} | {ours['load_s']:.1f} | {k['per_step']:.0f} {k['what']} | "
                     f"{_cell(g.get('cuda_graph_capture_s'), '.2f')} | "
                     f"{_cell(None if mem is None else mem / (1 << 20), '.0f')} | {_cell(replays, 'd')} |")
    lines += _async_table(results)
    return "\n".join(lines) + "\n"


def _async_table(results: dict) -> list[str]:
    """Async scheduling (the default on CUDA) against `--no-async-scheduling`, on the workloads run both ways."""
    lines = ["", "Async scheduling (the next decode step issued before the previous step's tokens reach the host) "
             "against `--no-async-scheduling`, each on its own engine. GPU idle (events): as above. GPU idle "
             "(kernels): one stream's decode steps under the profiler, the share of the time from its first GPU "
             "kernel to its last with none running (this also sees the GPU waiting inside a step for the host).",
             "", "| shape | workload | async tok/s | sync tok/s | gain | step ms async / sync | GPU idle (events) "
             "async / sync | GPU idle (kernels, 1 stream) async / sync | decodes planned ahead |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["shapes"].items():
        on, off = r["pipeserve"], r.get("pipeserve_sync")
        if not off:
            continue
        for w in r["workloads"]:
            if w["name"] not in off["workloads"]:
                continue
            a, b = on["workloads"][w["name"]], off["workloads"][w["name"]]
            steps = [x["step_s"].get(w["num_prompts"]) for x in (on, off)]
            steps = [None if t is None else t * 1e3 for t in steps]
            lines.append(f"| {name} | {w['name']} | {a['tok_s']:,.0f} | {b['tok_s']:,.0f} | "
                         f"{a['tok_s'] / b['tok_s']:.2f}x | {_cell(steps[0], '.2f')} / {_cell(steps[1], '.2f')} | "
                         f"{_cell(a.get('gpu_idle_between_decodes'), '.1%')} / "
                         f"{_cell(b.get('gpu_idle_between_decodes'), '.1%')} | "
                         f"{_cell(on.get('gpu_idle_kernels'), '.1%')} / {_cell(off.get('gpu_idle_kernels'), '.1%')} | "
                         f"{on.get('planned_ahead', 0)} / {off.get('planned_ahead', 0)} |")
    return lines
