"""Predicted time of a layout's steps: per stage max(FLOPs / effective peak, bytes / effective bandwidth), TP
all-reduces at ring cost over the group's slowest link, PP hand-offs over the link between stages, and the
engine's host time per step; then the schedule serve runs (one virtual engine per stage, each with one decode
step in flight). docs/planning.md has the equations.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeserve.config import ModelConfig
from pipeserve.planner.cpu_steps import LayerCosts, shape_key
from pipeserve.planner.hardware import Device
from pipeserve.planner.memory import Layout, Stage, layer_params

# Latency of one hop of a collective or one send, seconds (stated assumptions).
LINK_LATENCY_S = {"nvlink": 3e-6, "pcie": 8e-6, "inter": 15e-6}


@dataclass(frozen=True)
class Links:
    """Bandwidths (bytes/s, already scaled by the link efficiency) and which link each transfer takes."""

    intra: str  # "pcie" or "nvlink"
    intra_bps: float
    inter_bps: float
    intra_latency_s: float | None = None  # measured latency per message; None: the stated LINK_LATENCY_S
    same_machine: bool = False  # calibrated CPU: "nodes" are namespace hosts on the measured machine

    def latency(self, inter: bool) -> float:
        if inter and not (self.same_machine and self.intra_latency_s is not None):
            return LINK_LATENCY_S["inter"]
        return LINK_LATENCY_S[self.intra] if self.intra_latency_s is None else self.intra_latency_s


@dataclass(frozen=True)
class Step:
    """One step's work: `tokens` computed, `seqs` sequences reading `ctx` tokens of KV each, `sampled` rows.
    `chunk_start` None: the tokens are decodes, one per sequence; else they are prompt chunks, each after
    `chunk_start` earlier tokens of its prompt (`ctx` is then their mean context, for the FLOP count)."""

    tokens: float
    seqs: float
    ctx: float
    sampled: float
    chunk_start: float | None = None


@dataclass
class StepTime:
    """Seconds of one step, by where they go (summed over stages), and the slowest stage's busy time."""

    compute: float = 0.0  # stage time bounded by FLOPs
    hbm: float = 0.0  # stage time bounded by bytes read
    head: float = 0.0  # the LM head's part of the last stage's time
    ar_intra: float = 0.0
    ar_inter: float = 0.0
    handoff_intra: float = 0.0
    handoff_inter: float = 0.0
    host: float = 0.0
    slowest_stage: float = 0.0  # busy time (device + all-reduce) of the slowest stage
    slowest_is_last: bool = False
    busy_sum: float = 0.0  # busy time of all stages
    work: float = 0.0  # CPU-seconds of every process: each TP rank's device time and all-reduces, the host time

    @property
    def latency(self) -> float:
        """One step from issue to result: every stage, every hand-off, and the engine's host time."""
        return self.busy_sum + self.handoff_intra + self.handoff_inter + self.host

    @property
    def links(self) -> float:
        return self.ar_intra + self.ar_inter + self.handoff_intra + self.handoff_inter

    def parts(self) -> dict[str, float]:
        return {"compute": self.compute, "HBM": self.hbm, "intra-node all-reduce": self.ar_intra,
                "inter-node all-reduce": self.ar_inter, "intra-node hand-off": self.handoff_intra,
                "inter-node hand-off": self.handoff_inter, "host overhead": self.host}


def stage_device_time(model: ModelConfig, device: Device, stage: Stage, tp: int,
                      step: Step, corunning: bool = False) -> tuple[float, str, float]:
    """(seconds, "compute" or "HBM", seconds of the LM head) of one stage's device work for a step: the
    calibrated layer costs where --calibrate measured this rank shape (slowed by the co-running factor where
    other ranks of the layout share the machine's cores), else the roofline."""
    costs = calibrated_layers(model, device, stage, tp)
    if costs is not None:
        if step.chunk_start is None:
            layer = costs.layer(step.tokens, step.ctx, 0, 0, corunning)
        else:
            layer = costs.layer(0, 0, step.tokens, step.chunk_start, corunning)
        head = costs.tail(step.sampled, corunning) if stage.last else 0.0
        return stage.layers * layer + head, "compute", head
    hd = model.head_dim
    flops = 2.0 * step.tokens * stage.layers * layer_params(model, stage.q_heads, stage.kv_heads, tp)
    flops += 4.0 * step.tokens * stage.layers * step.ctx * stage.q_heads * hd  # QK^T and PV over the context
    head_flops = 2.0 * step.sampled * model.hidden_size * stage.vocab_rows if stage.last else 0.0
    read = stage.weight_bytes + step.seqs * step.ctx * stage.kv_bytes_per_token  # weights + KV read
    read += step.tokens * stage.kv_bytes_per_token  # the new tokens' KV written
    peak = device.flops_per_s(step.tokens)
    bw = device.hbm_gbps * 1e9 * device.eff_bw
    t_flops, t_bytes = (flops + head_flops) / peak, read / bw
    head_read = stage.vocab_rows * model.hidden_size * model.dtype_bytes if stage.last else 0
    head_share = head_flops / peak if t_flops >= t_bytes else head_read / bw
    return (t_flops, "compute", head_share) if t_flops >= t_bytes else (t_bytes, "HBM", head_share)


def calibrated_layers(model: ModelConfig, device: Device, stage: Stage, tp: int) -> LayerCosts | None:
    if not device.layer_costs:
        return None
    key = shape_key(model.hidden_size, model.intermediate_size // tp, stage.q_heads, stage.kv_heads, model.head_dim,
                    stage.vocab_rows, model.dtype)
    found = device.layer_costs.get(key)
    return None if found is None else LayerCosts.from_dict(found)


def busy_allreduce(device: Device, layout: Layout, nbytes: float) -> tuple[float, float] | None:
    """(wall seconds, CPU-seconds per rank) that one all-reduce of `nbytes` over the layout's TP group adds between
    busy ranks, from what --calibrate measured between TP pairs (with the measured count of busy processes
    nearest the layout's ranks from above, else the largest); None on an uncalibrated device. A ring of T ranks
    takes T - 1 of a pair's exchanges, each of 2 / T of the tensor."""
    walls, cpus = device.allreduce_busy_us, device.allreduce_cpu_us
    if not walls:
        return None
    above = [w for w in walls if w >= layout.world]
    world = min(above) if above else max(walls)
    pair_bytes, hops = 2 * nbytes / layout.tp, layout.tp - 1
    wall = hops * at_bytes(walls[world], pair_bytes) * 1e-6
    cpu = hops * at_bytes(cpus[world], pair_bytes) * 1e-6 if world in cpus else 0.0
    return wall, cpu


def at_bytes(points: tuple[tuple[float, float], ...], nbytes: float) -> float:
    """A measured cost at `nbytes`: linear between the measured message sizes and along the last two points'
    slope past them; below the smallest, its cost (a message's fixed cost dominates there)."""
    if len(points) == 1 or nbytes <= points[0][0]:
        return points[0][1]
    i = next((i for i in range(1, len(points)) if nbytes <= points[i][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(0.0, y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0))


def allreduce_time(nbytes: float, tp: int, bps: float, latency: float) -> float:
    """Ring all-reduce: 2 (T-1) hops, each moving 1/T of the tensor."""
    return 2 * (tp - 1) * latency + 2 * (tp - 1) / tp * nbytes / bps


def step_time(model: ModelConfig, device: Device, layout: Layout, stages: list[Stage], links: Links,
              step: Step) -> StepTime:
    """Seconds of one step through every stage of the layout."""
    out = StepTime(host=device.host_ms / 1e3)
    elem = model.dtype_bytes
    spans = layout.tp_spans_nodes()
    ar_bps = links.inter_bps if spans else links.intra_bps
    ar_lat = links.latency(spans)
    act_bytes = step.tokens * model.hidden_size * elem  # one all-reduce's tensor
    corunning = device.cores > 1 and layout.world > 1  # a calibrated CPU whose cores run several ranks at once
    # one all-reduce's (wall seconds, CPU-seconds per rank), the same on every stage; None: the ring's formula
    measured = None
    if layout.tp > 1 and (links.same_machine or not spans):
        measured = busy_allreduce(device, layout, act_bytes)
    if measured is not None and spans:  # measured over loopback; a slower link between nodes adds its transfer
        slower = allreduce_time(act_bytes, layout.tp, ar_bps, 0.0) - allreduce_time(
            act_bytes, layout.tp, links.intra_bps, 0.0)
        measured = (measured[0] + max(0.0, slower), measured[1])
    for s, stage in enumerate(stages):
        t_dev, kind, head = stage_device_time(model, device, stage, layout.tp, step, corunning)
        if kind == "compute":
            out.compute += t_dev
        else:
            out.hbm += t_dev
        out.head += head
        ar = ar_cpu = 0.0
        if layout.tp > 1:  # attention output and MLP output: 2 per layer
            if measured is None:
                ar = 2 * stage.layers * allreduce_time(act_bytes, layout.tp, ar_bps, ar_lat)
            else:
                ar, ar_cpu = 2 * stage.layers * measured[0], 2 * stage.layers * measured[1]
            if spans:
                out.ar_inter += ar
            else:
                out.ar_intra += ar
        busy = t_dev + ar
        out.busy_sum += busy
        out.work += layout.tp * (t_dev + ar_cpu)
        if busy >= out.slowest_stage:
            out.slowest_stage, out.slowest_is_last = busy, stage.last
        if s < len(stages) - 1:  # hidden and residual to the next stage
            handoff_bytes = step.tokens * model.hidden_size * 2 * elem
            if layout.handoff_crosses_nodes(s):
                out.handoff_inter += handoff_bytes / links.inter_bps + links.latency(True)
            else:
                out.handoff_intra += handoff_bytes / links.intra_bps + links.latency(False)
    out.work += out.host
    return out


def step_period(t: StepTime, num_ve: int, cores: int = 0) -> float:
    """Seconds between two steps of one virtual engine when every VE keeps one step in flight: its own step's
    latency, unless a stage, the engine's host loop, or (with `cores` > 0: processes sharing that many CPUs)
    the CPUs serve the VEs' steps more slowly."""
    shared = num_ve * t.work / cores if cores > 0 else 0.0
    return max(t.latency, num_ve * t.slowest_stage, num_ve * t.host, shared)


def bottleneck(t: StepTime, num_ve: int, pp: int, cores: int = 0) -> str:
    """Where a decode step's time goes, in words: the largest part, or the stage that sets the pace."""
    period = step_period(t, num_ve, cores)
    if cores > 0 and period == num_ve * t.work / cores and period > max(t.latency, num_ve * t.slowest_stage):
        return "shared cores"
    if pp > 1 and period == num_ve * t.slowest_stage and t.slowest_is_last and t.head > 0.25 * t.slowest_stage:
        return "LM-head stage"
    if period == num_ve * t.host and t.host >= t.slowest_stage:
        return "host overhead"
    parts = t.parts()
    return max(parts, key=parts.__getitem__)
