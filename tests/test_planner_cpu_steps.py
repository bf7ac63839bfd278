"""A calibrated CPU's step and schedule by hand: measured layer costs times layers plus the tail, the TP
all-reduce measured between busy ranks, decode groups, and processes sharing the calibrated cores."""

from __future__ import annotations

import pytest
import torch

from pipeserve.planner.calibration import calibrated_cpu
from pipeserve.planner.cost_model import Step, at_bytes, busy_allreduce, step_period, step_time
from pipeserve.planner.cpu_steps import LayerCosts, interpolate, shape_key
from pipeserve.planner.memory import Layout, build_stages, check_layout
from pipeserve.planner.plan import Cluster, Workload, decode_groups, offline_prefill_s, plan_layout
from tests.planner_fixtures import FIGURES, small

COSTS = {"base": [[1, 1e-3], [64, 4e-3], [512, 20e-3]], "attn_s_per_row_ctx": 1e-7, "prefill_s_per_row_ctx": 2e-8,
         "head": [[1, 2e-3], [64, 8e-3]]}
COSTS_DECODE_8_AT_100 = 1e-3 + 3e-3 * 7 / 63 + 1e-7 * 8 * 100  # one layer: 8 decodes at context 100


def device(tp: int, cores: int = 2, allreduce_us: dict | None = None, allreduce_cpu_us: dict | None = None):
    cfg = small(torch.float32)
    (stage, *_) = build_stages(cfg, tp, check_layout(cfg, tp, 1))
    key = shape_key(64, 128 // tp, stage.q_heads, stage.kv_heads, 8, stage.vocab_rows, "float32")
    data = {**FIGURES, "layers": {key: COSTS}, "cores": cores, "allreduce_busy_us": allreduce_us or {},
            "allreduce_cpu_us": allreduce_cpu_us or {}}
    return calibrated_cpu("cal.json", data, "float32")


def test_interpolation_between_and_beyond_the_measured_rows():
    points = ((1, 1.0), (5, 3.0))
    assert interpolate(points, 1) == 1.0 and interpolate(points, 3) == 2.0 and interpolate(points, 10) == 6.0


def test_a_decode_and_a_chunk_step_by_hand():
    cfg, dev = small(torch.float32), device(1)
    (stage,) = build_stages(cfg, 1, [6])
    links = Cluster(dev, 1, 1, "pcie", 1).links()
    decode = step_time(cfg, dev, Layout(1, 1, 1, 1), [stage], links, Step(8, 8, 100, 8))
    layer = COSTS_DECODE_8_AT_100
    tail = 2e-3 + 6e-3 * 7 / 63
    assert decode.busy_sum == pytest.approx(6 * layer + tail)
    assert decode.work == pytest.approx(6 * layer + tail + dev.host_ms / 1e3)
    chunk = step_time(cfg, dev, Layout(1, 1, 1, 1), [stage], links, Step(512, 1, 512, 1, chunk_start=512))
    assert chunk.busy_sum == pytest.approx(6 * (20e-3 + 2e-8 * 512 * 512) + 2e-3)


def test_tp_allreduce_measured_between_busy_ranks():
    walls = {"2": [[1024, 300.0], [4096, 600.0]], "4": [[1024, 900.0], [4096, 1500.0]]}
    cpus = {"2": [[1024, 100.0], [4096, 400.0]], "4": [[1024, 50.0], [4096, 80.0]]}
    cfg, dev = small(torch.float32), device(2, allreduce_us=walls, allreduce_cpu_us=cpus)
    stages = build_stages(cfg, 2, [6])
    links = Cluster(dev, 1, 2, "pcie", 1).links()
    # 8 rows of 64 float32: 2048 bytes, a third of the way from 1024 to 4096 bytes; 2 all-reduces per layer
    t = step_time(cfg, dev, Layout(2, 1, 1, 2), stages, links, Step(8, 8, 100, 8))
    assert t.ar_intra == pytest.approx(2 * 6 * 400e-6)
    rank = 6 * COSTS_DECODE_8_AT_100 + 2e-3 + 6e-3 * 7 / 63  # its layers and the tail
    assert t.busy_sum == pytest.approx(rank + t.ar_intra)
    # each rank's CPU-seconds count the all-reduces' CPU, not their wall time
    assert t.work == pytest.approx(2 * (rank + 2 * 6 * 200e-6) + dev.host_ms / 1e3)
    # a layout of 4 busy ranks reads the 4-rank measurement
    assert busy_allreduce(dev, Layout(2, 2, 1, 4), 2048) == pytest.approx((1100e-6, 60e-6))
    # a ring of 4 takes 3 of a pair's exchanges, each of half the tensor
    assert busy_allreduce(dev, Layout(4, 1, 1, 4), 4096) == pytest.approx((3 * 1100e-6, 3 * 60e-6))


def test_measured_costs_between_and_past_the_measured_message_sizes():
    points = ((1024.0, 300.0), (4096.0, 600.0))
    assert at_bytes(points, 10) == 300.0  # below the smallest message: its fixed cost
    assert at_bytes(points, 2048) == pytest.approx(400.0)
    assert at_bytes(points, 7168) == pytest.approx(900.0)  # past the largest: along the last slope
    assert at_bytes(((1024.0, 300.0),), 1e6) == 300.0


def test_groups_and_shared_cores_set_the_period():
    cfg, dev = small(torch.float32), device(1, cores=1)
    # 8 prompts of 256 tokens, PP=2: a virtual engine's 4 prompts take 2 chunks of 512 tokens, so they end
    # their prefills in 2 steps and decode in 2 groups (its 2 steps in flight): 4 groups of 2 requests
    row = plan_layout(cfg, Cluster(dev, 1, 2, "pcie", 1), Layout(1, 2, 1, 2), Workload(256, 16, 512, 8, 0.9))
    assert row.status == "ok" and row.decode_groups == 4
    stages = build_stages(cfg, 1, check_layout(cfg, 1, 2))
    t = step_time(cfg, dev, Layout(1, 2, 1, 2), stages, Cluster(dev, 1, 2, "pcie", 1).links(), Step(2, 2, 264, 2))
    assert row.tpot_ms == pytest.approx(step_period(t, 4, 1) * 1e3)
    assert step_period(t, 4, 1) == pytest.approx(4 * t.work)  # one core: every process's work in turn
    assert row.bottleneck == "shared cores"


def test_decode_groups_follow_how_prompts_end_their_prefills():
    # short prompts: one 512-token chunk ends 4 prompts of 128 at once (serve ran 2 x 15 decode steps + 2 chunks
    # for 8 such prompts at PP=2, and 4 x 15 + 4 at PP=4)
    assert decode_groups(8, 2, 2, 128, 512) == 2 and decode_groups(8, 4, 4, 128, 512) == 4
    assert decode_groups(8, 1, 1, 128, 512) == 1  # PP=1: one step in flight
    assert decode_groups(8, 2, 2, 1024, 512) == 4  # a prompt per chunk at most: every step in flight has a group
    assert decode_groups(2, 4, 4, 1024, 512) == 2  # never more groups than requests


def test_offline_prefill_packs_each_virtual_engines_own_prompts():
    cfg, dev = small(torch.float32), device(1, cores=2)
    layout = Layout(1, 4, 1, 4)
    stages = build_stages(cfg, 1, check_layout(cfg, 1, 4))
    links = Cluster(dev, 1, 4, "pcie", 1).links()
    steps = []

    def timed(step: Step):
        steps.append(step)
        return step_time(cfg, dev, layout, stages, links, step)

    def pace(t) -> float:
        return max(t.slowest_stage, t.host)

    # 8 prompts of 128 on PP=4, 512-token chunks: 4 chunks of 256 tokens (a VE's 2 prompts), not 2 of 512
    seconds = offline_prefill_s(Workload(128, 16, 512, 8, 0.9), 8, 4, 512, timed, pace, cores=2)
    (step,) = steps
    assert (step.tokens, step.sampled, step.chunk_start) == (256, 2, 0.0)
    t = timed(step)
    # the first chunk's trip and 3 slowest stages after it, or 4 chunks' CPU-seconds over 2 cores
    assert seconds == pytest.approx(max(t.latency + 3 * pace(t), 4 * t.work / 2))
    assert seconds == pytest.approx(4 * t.work / 2)  # four ranks on two cores: the cores set the pace here
    # a VE's 4 prompts of 1024 take 8 chunks of 512, each after 256 earlier tokens of its prompt on average
    steps.clear()
    seconds = offline_prefill_s(Workload(1024, 16, 2048, 8, 0.9), 8, 2, 512, timed, pace, cores=0)
    (step,) = steps
    assert (step.tokens, step.sampled, step.chunk_start) == (512, 0.5, 256.0)
    t = timed(step)
    assert seconds == pytest.approx(t.latency + 15 * pace(t))


def test_layer_costs_are_measured_with_the_models_own_layer():
    from pipeserve.planner.calibrate_ops import measure_layer_costs, rank_shape_key

    cfg = small(torch.float32)
    costs = measure_layer_costs(cfg, 2, seconds=0.01, decode_rows=(1, 4), prefill_rows=(16,))
    assert [rows for rows, _ in costs["base"]] == [1, 4, 16]
    assert all(t > 0 for _, t in costs["base"]) and all(t > 0 for _, t in costs["head"])
    assert costs["attn_s_per_row_ctx"] >= 0 and costs["prefill_s_per_row_ctx"] >= 0
    LayerCosts.from_dict(costs)  # the form a plan reads back
    (stage,) = build_stages(cfg, 2, [6])
    assert rank_shape_key(cfg, 2) == shape_key(64, 64, stage.q_heads, stage.kv_heads, 8, stage.vocab_rows, "float32")


def test_timed_layers_stream_their_weights_past_the_last_level_cache(monkeypatch):
    from pipeserve.planner import calibrate_ops

    assert calibrate_ops.last_level_cache_bytes() >= 1 << 20  # sysfs read on this machine (or the 32 MiB default)
    cfg = small(torch.float32)  # 6 layers: q, o of 8 heads of 8, k, v of 2, a 3 x 64 x 128 MLP, two norms of 64
    layer_bytes = (64 * (8 + 2 * 2) * 8 + 8 * 8 * 64 + 3 * 64 * 128 + 2 * 64) * 4
    monkeypatch.setattr(calibrate_ops, "last_level_cache_bytes", lambda: layer_bytes)
    assert calibrate_ops.streamed_layer_count(cfg) == 4  # four times the cache
    monkeypatch.setattr(calibrate_ops, "last_level_cache_bytes", lambda: 32 << 20)
    assert calibrate_ops.streamed_layer_count(cfg) == 6  # never more layers than the model has


def test_the_corunning_factor_slows_layouts_of_several_ranks_only():
    costs = LayerCosts.from_dict({**COSTS, "corun": [[1, 1.5], [16, 1.3], [512, 1.1]]})
    alone = costs.layer(8, 100, 0, 0)
    assert costs.layer(8, 100, 0, 0, corunning=True) == pytest.approx(alone * (1.5 + (1.3 - 1.5) * 7 / 15))
    assert costs.slowdown(0.5) == 1.5 and costs.slowdown(4096) == 1.1  # the nearest measured outside the rows
    assert costs.tail(1, corunning=True) == pytest.approx(1.5 * costs.tail(1))
    assert LayerCosts.from_dict(COSTS).slowdown(8) == 1.0  # a file without the factor: as measured alone

    cfg = small(torch.float32)
    dev = calibrated_cpu("cal.json", {**FIGURES, "cores": 2, "allreduce_busy_us": {},
                                      "layers": {device(1).layer_costs.popitem()[0]: {**COSTS, "corun": [[1, 2.0]]}}},
                         "float32")
    links = Cluster(dev, 1, 2, "pcie", 1).links()

    def decode(pp: int):
        stages = build_stages(cfg, 1, check_layout(cfg, 1, pp))
        return step_time(cfg, dev, Layout(1, pp, 1, pp), stages, links, Step(4, 4, 64, 4))

    one, two = decode(1), decode(2)
    assert two.busy_sum == pytest.approx(2 * one.busy_sum)  # PP=2's ranks run at once: each layer twice as slow


@pytest.mark.slow  # starts one process per core
def test_the_corunning_factor_is_measured_with_every_core_busy():
    from pipeserve.planner.calibrate_corun import corun_factors

    factors = corun_factors(small(torch.float32), 1, processes=2, seconds=0.02, rows=(1, 16))
    assert [rows for rows, _ in factors] == [1, 16] and all(f >= 1.0 for _, f in factors)
