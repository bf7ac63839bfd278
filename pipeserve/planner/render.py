"""The plan as a table for people, or as JSON for scripts."""

from __future__ import annotations

import json
from dataclasses import asdict

from pipeserve.config import ModelConfig
from pipeserve.engine.arg_utils import CPU_KV_CACHE_GB
from pipeserve.planner.cost_model import LINK_LATENCY_S
from pipeserve.planner.memory import RUNTIME_RESERVE_GB
from pipeserve.planner.plan import Cluster, Row, Workload

_HEADER = ("TP", "PP", "nodes", "VEs", "in flight", "weights GB/dev", "KV tok/dev", "max-len reqs", "conc",
           "TTFT ms", "TPOT ms", "out tok/s", "bubble", "links", "bottleneck")


def assumptions(cluster: Cluster) -> list[str]:
    d = cluster.device
    lat = ", ".join(f"{k} {v * 1e6:g} us" for k, v in LINK_LATENCY_S.items())
    if d.calibration:
        return _calibrated(cluster)
    return [
        f"{d.name}: {d.memory_gb:g} GB, {d.hbm_gbps:g} GB/s memory, {d.bf16_tflops:g} TFLOP/s dense bf16, "
        f"{cluster.intra} {d.link_gbps(cluster.intra):g} GB/s per direction ({d.source})",
        f"effective fractions: bandwidth {d.eff_bw:.2f}, FLOPs {d.eff_flops:.2f}, links {d.eff_link:.2f} "
        f"({d.eff_source}); host time {d.host_ms:g} ms per step",
        f"between nodes: {cluster.inter_gbps:g} Gbit/s; latency per hop: {lat}",
    ] + ([f"per process: serve's CPU KV budget of {CPU_KV_CACHE_GB:g} GiB per stage (gpu-memory-utilization "
          f"does not apply)"] if d.name == "cpu" else
         [f"per device: {RUNTIME_RESERVE_GB:g} GB runtime reserve (CUDA context, allocator, graphs) besides "
          f"weights, KV and the largest step's activations"])


def _calibrated(cluster: Cluster) -> list[str]:
    d = cluster.device
    curve = ", ".join(f"{rows} rows {tflops * 1e3:.1f}" for rows, tflops in d.gemm_curve)
    return [
        d.calibration,
        f"{d.name}: {d.source}; GEMM GFLOP/s by rows: {curve}; copy {d.hbm_gbps:.1f} GB/s; loopback link "
        f"{d.pcie_gbps:.2f} GB/s, {d.link_latency_us:.0f} us per message; effective fractions 1.0 "
        f"(measured rates); host time {d.host_ms:g} ms per step (stated)",
        f"between nodes: {cluster.inter_gbps:g} Gbit/s at {d.eff_link:.2f} of it (stated); "
        + ("latencies as measured on this machine (the nodes are namespace hosts sharing it)" if d.cores else
           f"{LINK_LATENCY_S['inter'] * 1e6:g} us per hop (stated)"),
        f"per process: serve's CPU KV budget of {CPU_KV_CACHE_GB:g} GiB per stage (gpu-memory-utilization "
        f"does not apply)",
    ] + _measured_steps(d)


def _measured_steps(d) -> list[str]:
    lines = []
    if d.layer_costs:
        lines.append(f"steps of the rank shapes {', '.join(sorted(d.layer_costs))}: the model's decoder layer as "
                     f"measured (other shapes: the GEMM rate and copy bandwidth above)")
    if d.allreduce_busy_us:
        def sizes(world: int) -> str:
            cpu = dict(d.allreduce_cpu_us.get(world, ()))
            return " / ".join(f"{us:.0f} us (CPU {cpu.get(b, 0.0):.0f}) at {b / 1024:.0f} KiB"
                              for b, us in d.allreduce_busy_us[world])

        busy = "; ".join(f"{k} busy ranks: {sizes(k)}" for k in sorted(d.allreduce_busy_us))
        lines.append(f"a TP pair's all-reduce between busy ranks: {busy}")
    if d.cores:
        lines.append(f"every process of a layout shares this machine's {d.cores} cores (namespace hosts included)")
    return lines


def best(rows: list[Row]) -> Row:
    """The fitting layout with the most output tokens/s (fewer devices on a tie)."""
    return max((r for r in rows if r.status == "ok"), key=lambda r: (r.output_tok_s, -r.devices))


def _cells(r: Row) -> tuple[str, ...]:
    return (str(r.tp), str(r.pp), str(r.nodes), str(r.virtual_engines), str(r.steps_in_flight),
            f"{r.weights_gb:.1f}", f"{r.kv_tokens_per_device:,}", f"{r.max_len_requests:,}",
            f"{r.concurrency}{'*' if r.concurrency_capped else ''}",
            f"{r.ttft_ms:,.0f}", f"{r.tpot_ms:.1f}", f"{r.output_tok_s:,.0f}", f"{r.bubble:.0%}",
            f"{r.link_share:.0%}", r.bottleneck)


def render_table(model: ModelConfig, cluster: Cluster, work: Workload, rows: list[Row]) -> str:
    fitting = [r for r in rows if r.status == "ok"]
    smallest = min(fitting, key=lambda r: (r.devices, -r.output_tok_s))
    conc = "auto" if work.concurrency is None else str(work.concurrency)
    lines = [f"plan: {model.path} ({model.dtype}) on {cluster.nodes} x "
             f"{cluster.gpus_per_node} {cluster.device.name}; {work.input_len} in / {work.output_len} out, "
             f"max-model-len {work.max_model_len}, concurrency {conc}, gpu-memory-utilization {work.utilization}",
             ""]
    widths = [max(len(h), *(len(_cells(r)[i]) for r in fitting)) for i, h in enumerate(_HEADER)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(_HEADER, widths, strict=True)).rstrip())
    for r in fitting:
        lines.append("  ".join(c.rjust(w) for c, w in zip(_cells(r), widths, strict=True)).rstrip())
    if any(r.concurrency_capped for r in fitting):
        lines.append(f"* the KV cache (or max_num_seqs per virtual engine) holds fewer than --concurrency "
                     f"{work.concurrency} requests of {work.input_len + work.output_len} tokens")
    others = [r for r in rows if r.status != "ok"]
    if others:
        lines += ["", f"layouts that do not run (the smallest that fits: TP={smallest.tp} x PP={smallest.pp}, "
                      f"{smallest.devices} devices):"]
        for r in others:
            verdict = "serve rejects" if r.status == "rejected" else "does not fit"
            lines.append(f"  TP={r.tp} x PP={r.pp} ({r.devices} devices): {verdict}: {r.reason}")
    rec = best(rows)
    lines += ["", f"recommended: TP={rec.tp} x PP={rec.pp} on {rec.nodes} node(s): {rec.output_tok_s:,.0f} output "
                  f"tok/s at concurrency {rec.concurrency}, TTFT {rec.ttft_ms:,.0f} ms, bottleneck {rec.bottleneck}",
              "", "assumptions:"]
    lines += [f"  {a}" for a in assumptions(cluster)]
    return "\n".join(lines)


def render_json(model: ModelConfig, cluster: Cluster, work: Workload, rows: list[Row]) -> str:
    rec = best(rows)
    return json.dumps({
        "model": model.path, "dtype": model.dtype,
        "cluster": {"device": asdict(cluster.device), "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                    "intra_node": cluster.intra, "inter_node_gbps": cluster.inter_gbps},
        "workload": asdict(work), "assumptions": assumptions(cluster),
        "layouts": [asdict(r) for r in rows], "recommended": {"tp": rec.tp, "pp": rec.pp},
    }, indent=2)
