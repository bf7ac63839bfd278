"""Every TP x PP layout of a model on a described cluster: what serve would accept, what fits, what it predicts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeserve.config import ModelConfig
from pipeserve.planner.cost_model import Links, Step, bottleneck, step_period, step_time
from pipeserve.planner.hardware import Device
from pipeserve.planner.memory import (
    BLOCK_SIZE,
    Layout,
    build_stages,
    check_layout,
    kv_blocks_per_ve,
    kv_pool_bytes,
    scheduler_for,
)


@dataclass(frozen=True)
class Cluster:
    device: Device
    nodes: int
    gpus_per_node: int
    intra: str  # "pcie" or "nvlink"
    inter_gbps: float  # Gbit/s between machines

    def links(self) -> Links:
        d, eff = self.device, self.device.eff_link
        # A calibrated intra-node link is a measured effective rate; the inter-node one stays a stated figure.
        intra_eff = 1.0 if d.calibration else eff
        lat = d.link_latency_us * 1e-6 if d.link_latency_us > 0 else None
        return Links(self.intra, d.link_gbps(self.intra) * 1e9 * intra_eff, self.inter_gbps / 8 * 1e9 * eff, lat,
                     same_machine=d.cores > 0)

    @property
    def device_kind(self) -> str:
        return "cpu" if self.device.name == "cpu" else "cuda"


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    max_model_len: int
    concurrency: int | None  # None: as many as fit, up to max_num_seqs per virtual engine
    utilization: float
    num_kv_blocks: int | None = None  # serve's --num-kv-blocks: KV blocks per rank instead of a memory budget


@dataclass
class Row:
    """One layout: `status` is "ok", "no fit" (why in `reason`) or "rejected" (serve's message in `reason`)."""

    tp: int
    pp: int
    nodes: int
    status: str
    reason: str = ""
    devices: int = 0
    virtual_engines: int = 0
    steps_in_flight: int = 0  # per virtual engine, as serve runs them
    stage_weights_bytes: list[int] = field(default_factory=list)  # per stage, on its busiest rank
    stage_kv_bytes: list[int] = field(default_factory=list)  # the KV pool's tensors, per stage, busiest rank
    decode_groups: int = 0  # groups of running requests taking turns, one decode step in flight each
    weights_gb: float = 0.0  # per device, busiest stage
    kv_bytes_per_token: int = 0  # per device, busiest stage
    kv_tokens_per_device: int = 0
    max_len_requests: int = 0  # requests of max_model_len that fit, all virtual engines together
    concurrency: int = 0
    concurrency_capped: bool = False  # fewer than --concurrency fit
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    output_tok_s: float = 0.0
    bubble: float = 0.0
    link_share: float = 0.0
    bottleneck: str = ""


def candidate_layouts(nodes: int, per_node: int) -> list[Layout]:
    """Device counts serve can spread evenly: a divisor of one machine's devices, or whole machines; each
    factored into every TP x PP."""
    worlds = [(w, 1) for w in range(1, per_node + 1) if per_node % w == 0]
    worlds += [(k * per_node, k) for k in range(2, nodes + 1)]
    return [Layout(tp, w // tp, n, w // n) for w, n in worlds for tp in range(1, w + 1) if w % tp == 0]


def check_workload(model: ModelConfig, work: Workload) -> None:
    for name in ("input_len", "output_len", "max_model_len"):
        if getattr(work, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(work, name)}")
    if work.concurrency is not None and work.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 or auto, got {work.concurrency}")
    if work.num_kv_blocks is not None and work.num_kv_blocks < 1:
        raise ValueError(f"num-kv-blocks must be >= 1, got {work.num_kv_blocks}")
    if not 0 < work.utilization <= 1:
        raise ValueError(f"gpu-memory-utilization must be in (0, 1], got {work.utilization}")
    if work.max_model_len > model.max_position_embeddings:
        raise ValueError(f"max_model_len {work.max_model_len} exceeds the model's max_position_embeddings "
                         f"{model.max_position_embeddings}")
    if work.input_len + work.output_len > work.max_model_len:
        raise ValueError(f"input-len + output-len = {work.input_len + work.output_len} exceeds "
                         f"max-model-len={work.max_model_len}")


def plan_layout(model: ModelConfig, cluster: Cluster, layout: Layout, work: Workload) -> Row:
    row = Row(layout.tp, layout.pp, layout.nodes, "ok", devices=layout.world)
    try:
        sizes = check_layout(model, layout.tp, layout.pp)
    except ValueError as exc:
        row.status, row.reason = "rejected", str(exc)
        return row
    stages = build_stages(model, layout.tp, sizes)
    sched = scheduler_for(work.max_model_len, layout.pp, cluster.device_kind)
    row.virtual_engines, row.steps_in_flight = layout.pp, sched.max_steps_in_flight_per_ve  # serve's defaults
    row.weights_gb = max(s.weight_bytes for s in stages) / 1e9
    row.kv_bytes_per_token = max(s.kv_bytes_per_token for s in stages)
    try:
        blocks = kv_blocks_per_ve(model, cluster.device, layout, stages, sched, work.utilization, layout.pp,
                                  work.num_kv_blocks)
    except ValueError as exc:
        row.status, row.reason = "no fit", str(exc)
        return row
    ves = row.virtual_engines
    row.stage_weights_bytes = [s.weight_bytes for s in stages]
    row.stage_kv_bytes = [kv_pool_bytes(s, blocks, ves) for s in stages]
    row.kv_tokens_per_device = blocks * BLOCK_SIZE * ves
    row.max_len_requests = (blocks * BLOCK_SIZE // work.max_model_len) * ves
    per_request = math.ceil((work.input_len + work.output_len) / BLOCK_SIZE)
    room = min(sched.max_num_seqs, blocks // per_request) * ves
    row.concurrency = room if work.concurrency is None else min(work.concurrency, room)
    row.concurrency_capped = work.concurrency is not None and room < work.concurrency
    _predict(model, cluster, layout, stages, sched, work, row)
    return row


def decode_groups(concurrency: int, ves: int, in_flight: int, input_len: int, token_budget: int) -> int:
    """How many groups the running requests decode in, taking turns with one step in flight each (predicted
    with an even split over them).

    serve plans a virtual engine's next step while its earlier ones are in flight, with the requests none of
    them holds, so a group keeps its requests. Offline, every request arrives at once; a VE packs its prompts
    into chunks of `token_budget` tokens, and the prompts whose prefill ends in the same step start decoding
    together. So a VE decodes in as many groups as its prompts' prefills end in distinct steps, at most its
    steps in flight (8 prompts of 128 tokens on PP=2 with a 512-token budget: one chunk per VE, 2 groups of 4).
    """
    per_ve = math.ceil(concurrency / ves)
    ending_together = max(1, token_budget // input_len)  # prompts whose prefill ends in one chunk
    return max(1, min(concurrency, ves * min(in_flight, math.ceil(per_ve / ending_together))))


def _predict(model, cluster, layout, stages, sched, work, row: Row) -> None:
    """Fill the row's times: one decode step at the concurrency, chunked prefill, and a whole offline run."""
    links, ves, cores = cluster.links(), row.virtual_engines, cluster.device.cores
    groups = decode_groups(row.concurrency, ves, sched.max_steps_in_flight_per_ve, work.input_len,
                           sched.max_num_batched_tokens)
    seqs = row.concurrency / groups

    def timed(step: Step):
        return step_time(model, cluster.device, layout, stages, links, step)

    streaming = ves * sched.max_steps_in_flight_per_ve > 1  # serve keeps several chunks in flight

    def pace(t) -> float:
        """Seconds per chunk when chunks stream through the pipeline: its slowest stage or the engine's host."""
        return max(t.slowest_stage, t.host) if streaming else t.latency

    decode = timed(Step(seqs, seqs, work.input_len + work.output_len / 2, seqs))
    period = step_period(decode, groups, cores)
    budget = sched.max_num_batched_tokens
    chunk = min(work.input_len, budget)
    chunks = math.ceil(work.input_len / budget)
    first = timed(Step(chunk, 1, chunk / 2, 1, chunk_start=0))
    later = timed(Step(chunk, 1, chunk / 2, 1, chunk_start=budget * chunks / 2)) if chunks > 1 else first
    row.ttft_ms = streamed_s(first, later, chunks, pace, cores) * 1e3  # a long prompt's chunks stream too
    prefill_s = offline_prefill_s(work, row.concurrency, ves, budget, timed, pace, cores)
    row.output_tok_s = row.concurrency * work.output_len / (prefill_s + (work.output_len - 1) * period)
    row.tpot_ms = period * 1e3
    row.decode_groups = groups
    row.bubble = max(0.0, 1 - groups * decode.busy_sum / layout.pp / period)
    row.link_share = decode.links / decode.latency
    row.bottleneck = bottleneck(decode, groups, layout.pp, cores)


def offline_prefill_s(work: Workload, concurrency: int, ves: int, budget: int, timed, pace, cores: int) -> float:
    """Seconds to prefill every prompt of an offline run, all arriving at once.

    serve packs each virtual engine's own prompts into its chunks of at most `budget` tokens (8 prompts of 128
    on PP=4: 4 chunks of 256, one per VE, not 2 of 512), and the chunks stream through the stages.
    """
    ve_tokens = concurrency / ves * work.input_len
    ve_chunks = math.ceil(ve_tokens / budget)
    rows = ve_tokens / ve_chunks  # a chunk's tokens, on average
    per_chunk = rows / work.input_len  # prompts a chunk holds (under 1: a long prompt's share)
    # a long prompt's chunk comes, on average, after half of its earlier chunks
    start = budget * (math.ceil(work.input_len / budget) - 1) / 2 if work.input_len >= budget else 0.0
    step = timed(Step(rows, max(1.0, per_chunk), work.input_len / 2, per_chunk, chunk_start=start))
    return streamed_s(step, step, ves * ve_chunks, pace, cores)


def streamed_s(first, later, n: int, pace, cores: int) -> float:
    """Seconds of `n` chunks streaming through the stages (`first`, then n - 1 like `later`): the first chunk's
    trip through every stage and one `pace` per chunk after it, or, where the layout's processes share `cores`
    CPUs, at least every chunk's CPU-seconds spread over them."""
    critical_path = first.latency + (n - 1) * pace(later)
    if cores <= 0:
        return critical_path
    return max(critical_path, (first.work + (n - 1) * later.work) / cores)


def plan(model: ModelConfig, cluster: Cluster, work: Workload) -> list[Row]:
    """One row per candidate layout; ValueError when none of them fits, naming the smallest cluster that would."""
    check_workload(model, work)
    rows = [plan_layout(model, cluster, lay, work) for lay in candidate_layouts(cluster.nodes, cluster.gpus_per_node)]
    if not any(r.status == "ok" for r in rows):
        raise ValueError(f"no layout of {model.path} fits {cluster.nodes} x {cluster.gpus_per_node} "
                         f"{cluster.device.name}: {smallest_fit(model, cluster, work)}")
    return rows


def smallest_fit(model: ModelConfig, cluster: Cluster, work: Workload, max_nodes: int = 64) -> str:
    """The fewest machines of this shape on which some layout fits (TP inside a machine, PP across them)."""
    g = cluster.gpus_per_node
    for k in range(cluster.nodes + 1, max_nodes + 1):
        for tp in (t for t in range(g, 0, -1) if g % t == 0):
            layout = Layout(tp, k * g // tp, k, g)
            if layout.pp > model.num_hidden_layers:
                continue
            if plan_layout(model, cluster, layout, work).status == "ok":
                return (f"the smallest that would is TP={tp} x PP={layout.pp} on {k} nodes of {g} "
                        f"({k * g} devices)")
    return f"none would on up to {max_nodes} nodes of {g}"
