"""`pipeserve plan`: the arithmetic on a small shape by hand, serve's own verdicts, and the command's answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeserve.config import ModelConfig
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.planner.cost_model import LINK_LATENCY_S, Links, Step, allreduce_time, step_time
from pipeserve.planner.hardware import PRESETS, Device, load_device_spec
from pipeserve.planner.memory import BLOCK_SIZE, Layout, build_stages, check_layout, kv_blocks_per_ve, scheduler_for
from pipeserve.planner.plan import Cluster, Workload, candidate_layouts, plan, plan_layout
from pipeserve.planner.shapes import plan_model_config
from tests.planner_fixtures import FIGURES, SMALL, pipeserve_plan, small

# hidden 64, 8 query heads and 2 KV heads of 8 dims, intermediate 128, 6 layers, vocabulary 100.


@pytest.fixture
def small_folder(tmp_path) -> str:
    """A model folder with a config.json and no weights at all."""
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    return str(tmp_path)


def test_weights_and_kv_bytes_per_device_by_hand():
    cfg = small()
    sizes = check_layout(cfg, 2, 2)
    first, last = build_stages(cfg, 2, sizes)
    # One layer on a TP rank of 2: 4 query heads, 1 KV head (of 8 dims), half the MLP, both norms.
    layer = 64 * (4 + 2 * 1) * 8 + 4 * 8 * 64 + 3 * 64 * 64 + 2 * 64
    assert layer == 17536
    rows = 50  # ceil(100 / 2) rows of the embedding and of the LM head on each rank
    assert first.weight_bytes == 2 * (sizes[0] * layer + rows * 64)
    assert last.weight_bytes == 2 * (sizes[1] * layer + 64 + rows * 64)  # + the final norm
    assert first.kv_bytes_per_token == 2 * sizes[0] * 1 * 8 * 2  # K and V, 1 KV head of 8 dims, 2 bytes each


def test_one_stage_with_tied_embeddings_holds_one_matrix():
    cfg = ModelConfig.from_hf_dict("tied", {**SMALL, "tie_word_embeddings": True}, torch.float32)
    (stage,) = build_stages(cfg, 1, [6])
    layer = 64 * (8 + 2 * 2) * 8 + 8 * 8 * 64 + 3 * 64 * 128 + 2 * 64
    assert stage.weight_bytes == 4 * (6 * layer + 100 * 64 + 64)


def test_partition_and_scheduler_are_serves(small_folder):
    cfg = plan_model_config(small_folder, "float32", "cpu")
    for pp in (1, 2, 3):
        engine = EngineArgs(model=small_folder, pipeline_parallel_size=pp, device="cpu",
                            max_model_len=256).create_engine_config()
        assert check_layout(cfg, 1, pp) == list(engine.parallel.stage_layers)
        assert scheduler_for(256, pp, "cpu") == engine.scheduler


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_cpu_kv_pool_is_the_one_serve_sizes(small_folder, tp, pp):
    cfg = plan_model_config(small_folder, "float32", "cpu")
    engine = EngineArgs(model=small_folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, device="cpu",
                        dtype="float32", max_model_len=256).create_engine_config()
    cluster = Cluster(PRESETS["cpu"], 1, tp * pp, "pcie", 1)
    row = plan_layout(cfg, cluster, Layout(tp, pp, 1, tp * pp), Workload(16, 16, 256, None, 0.9))
    assert row.status == "ok", row.reason
    assert row.virtual_engines == engine.num_virtual_engines
    assert row.kv_tokens_per_device == engine.tokens_per_ve * engine.num_virtual_engines


@pytest.mark.parametrize("tp,pp", [(3, 1), (16, 1), (1, 7)])
def test_layouts_serve_rejects_carry_serves_message(small_folder, tp, pp):
    cfg = plan_model_config(small_folder, "float32", "cpu")
    with pytest.raises(ValueError) as serve_error:
        EngineArgs(model=small_folder, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                   device="cpu").create_engine_config()
    cluster = Cluster(PRESETS["H100"], 1, tp * pp, "nvlink", 100)
    row = plan_layout(cfg, cluster, Layout(tp, pp, 1, tp * pp), Workload(16, 16, 256, None, 0.9))
    assert row.status == "rejected"
    assert row.reason == str(serve_error.value)


def test_kv_blocks_follow_serves_sizing_rule_by_hand():
    cfg = small()
    device = Device("toy", 4, 100, 10, 10, 0, "test")
    layout = Layout(1, 1, 1, 1)
    stages = build_stages(cfg, 1, [6])
    sched = scheduler_for(256, 1, "cuda")
    blocks = kv_blocks_per_ve(cfg, device, layout, stages, sched, 0.5, 1)
    per_block = 2 * 6 * BLOCK_SIZE * 2 * 8 * 2  # K and V, 6 layers, 2 KV heads of 8 dims, bfloat16
    h = 64
    activation = sched.max_num_batched_tokens * (4 * h + (8 + 4) * 8 + 2 * 128) * 2 + sched.max_num_seqs * 200 * 4
    free = int(4e9 * 0.5) - (stages[0].weight_bytes + int(1e9)) - activation
    assert blocks == free // per_block - 1


def test_candidates_cover_one_machine_and_whole_machines():
    shapes = {(lay.tp, lay.pp, lay.nodes) for lay in candidate_layouts(2, 4)}
    assert shapes == {(1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 4, 1), (2, 2, 1), (4, 1, 1),
                      (1, 8, 2), (2, 4, 2), (4, 2, 2), (8, 1, 2)}
    assert Layout(8, 1, 2, 4).tp_spans_nodes() and not Layout(4, 2, 2, 4).tp_spans_nodes()
    assert Layout(4, 2, 2, 4).handoff_crosses_nodes(0)


def test_reference_case_tp_spanning_nodes_pays_links_and_pp_pays_decode_groups():
    """70B on 2 x 4 L4 with 50 Gbit/s between them: TP=8 all-reduces over Ethernet twice per layer; TP=4 x PP=2
    decodes in serve's groups (each VE's 8 prompts end their prefill in one 8,192-token chunk: one group per
    VE), each stage reading its weights once per group, and comes out ahead on the links."""
    rows = plan(plan_model_config("llama-3-70b", "auto", "cuda"), Cluster(PRESETS["L4"], 2, 4, "pcie", 50),
                Workload(1024, 128, 4096, None, 0.85))
    by_layout = {(r.tp, r.pp): r for r in rows}
    tp8, pp2 = by_layout[(8, 1)], by_layout[(4, 2)]
    assert tp8.status == pp2.status == "ok"
    assert tp8.link_share > pp2.link_share
    assert (tp8.decode_groups, pp2.decode_groups) == (1, 2)
    assert pp2.tpot_ms > tp8.tpot_ms and pp2.ttft_ms < tp8.ttft_ms
    assert pp2.output_tok_s > tp8.output_tok_s
    assert by_layout[(1, 1)].status == "no fit"


BASE = ("--model", "llama-3-8b", "--gpu", "H100", "--nodes", "1", "--gpus-per-node", "8")


@pytest.mark.parametrize("args,expected", [
    (("--model", "llama-3-8b", "--gpu", "B9000"), "unknown GPU 'B9000'; known: L4, A10G, A100-40GB"),
    ((*BASE, "--input-len", "-1"), "input-len must be >= 1, got -1"),
    (("--model", "llama-3-8b", "--gpu", "H100", "--nodes", "0"), "--nodes must be >= 1, got 0"),
    (("--model", "llama-3.1-405b", "--gpu", "L4", "--gpus-per-node", "8"),
     "the smallest that would is TP=8 x PP="),
    (("--model", "llama-3-8b", "--gpu", "L4", "--intra-node", "nvlink"), "L4 has no nvlink link"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    r = pipeserve_plan(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr


def test_malformed_device_spec(tmp_path):
    bad = tmp_path / "dev.json"
    bad.write_text('{"name": "X1", "memory_gb": 16,')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_device_spec(str(bad))
    bad.write_text(json.dumps({"name": "X1", "memory_gb": -16, "hbm_gbps": 1, "bf16_tflops": 1, "pcie_gbps": 1,
                               "source": "s"}))
    r = pipeserve_plan("--model", "llama-3-8b", "--gpu", "X1", "--device-spec", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "memory_gb must be a number >= 0, got -16" in r.stderr


def test_json_from_a_device_spec_without_any_model_file(tmp_path):
    """A built-in shape needs no file at all; the command imports no server, no checkpoint reader, and not torch
    (importing torch alone takes about 2 s here: the plan answers in well under 3 s without it)."""
    spec = tmp_path / "dev.json"
    spec.write_text(json.dumps({"name": "X1", "memory_gb": 48, "hbm_gbps": 1000, "bf16_tflops": 200,
                                "pcie_gbps": 32, "nvlink_gbps": 100, "source": "a test"}))
    code = ("import sys, runpy; sys.argv = ['pipeserve', 'plan', '--model', 'llama-3-8b', '--gpu', 'X1', "
            f"'--device-spec', {str(spec)!r}, '--gpus-per-node', '2', '--json'];\n"
            "from pipeserve.entrypoints.cli import main\nmain()\n"
            "print('LOADED', sorted(m for m in ('torch', 'fastapi', 'pipeserve.loader.safetensors_loader', "
            "'pipeserve.loader.gguf_loader', 'pipeserve.worker.worker') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    body, loaded = r.stdout.rsplit("LOADED", 1)
    assert loaded.strip() == "[]"
    result = json.loads(body)
    assert result["cluster"]["device"]["name"] == "X1"
    assert {(row["tp"], row["pp"]) for row in result["layouts"]} == {(1, 1), (1, 2), (2, 1)}
    assert all(row["status"] == "ok" for row in result["layouts"])
    assert (result["recommended"]["tp"], result["recommended"]["pp"]) in {(1, 1), (1, 2), (2, 1)}


def test_a_checkpoint_folder_on_a_calibrated_cpu_plans_without_torch(small_folder, tmp_path):
    """The path a CPU user takes: the model's config.json and this machine's calibration file, no torch."""
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({**FIGURES, "cores": 2, "allreduce_busy_us": {"2": [[1024, 300.0], [4096, 600.0]]},
                               "allreduce_cpu_us": {"2": [[1024, 100.0], [4096, 200.0]]}}))
    argv = ["pipeserve", "plan", "--model", small_folder, "--gpu", "cpu", "--calibration-file", str(cal),
            "--gpus-per-node", "2", "--input-len", "16", "--output-len", "16", "--max-model-len", "64",
            "--dtype", "float32", "--json"]
    code = (f"import sys; sys.argv = {argv!r}\n"
            "from pipeserve.entrypoints.cli import main\nmain()\nprint('TORCH', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    body, loaded = r.stdout.rsplit("TORCH", 1)
    assert loaded.strip() == "False"
    assert {(row["tp"], row["pp"]) for row in json.loads(body)["layouts"]} == {(1, 1), (1, 2), (2, 1)}


def test_step_time_by_hand():
    """One stage, TP=2 on one machine: the device term is the larger of FLOPs and bytes, then 2 all-reduces per
    layer at ring cost, then the host's time."""
    cfg = small()
    device = Device("toy", 4, 100, 1, 10, 0, "test", eff_bw=0.5, eff_flops=0.5, eff_link=1.0, host_ms=1.0)
    layout = Layout(2, 1, 1, 2)
    (stage,) = build_stages(cfg, 2, [6])
    step = Step(tokens=4, seqs=4, ctx=10, sampled=4)
    flops = 2 * 4 * 6 * 17536 + 4 * 4 * 6 * 10 * 4 * 8 + 2 * 4 * 64 * 50
    read = stage.weight_bytes + 4 * 10 * stage.kv_bytes_per_token + 4 * stage.kv_bytes_per_token
    t_dev = max(flops / 0.5e12, read / 50e9)
    hop = LINK_LATENCY_S["pcie"]
    ar = 2 * 6 * (2 * hop + 4 * 64 * 2 / 10e9)  # 2 (T-1) = 2 hops, 2 (T-1) / T = 1 of the tensor
    t = step_time(cfg, device, layout, [stage], Links("pcie", 10e9, 1e9), step)
    assert t.busy_sum == pytest.approx(t_dev + ar)
    assert t.ar_intra == pytest.approx(ar) and t.ar_inter == 0
    assert t.latency == pytest.approx(t_dev + ar + 1e-3)
    assert allreduce_time(1000, 4, 1e9, 0) == pytest.approx(2 * 3 / 4 * 1000 / 1e9)


def test_tp_across_machines_pays_the_inter_node_link():
    cfg = small()
    (stage,) = build_stages(cfg, 2, [6])
    links = Links("nvlink", 100e9, 1e9)
    step = Step(64, 64, 100, 64)
    inside = step_time(cfg, PRESETS["H100"], Layout(2, 1, 1, 2), [stage], links, step)
    across = step_time(cfg, PRESETS["H100"], Layout(2, 1, 2, 1), [stage], links, step)
    assert inside.ar_inter == 0 and across.ar_intra == 0
    assert across.ar_inter > inside.ar_intra


def test_a_concurrency_the_cache_cannot_hold_is_capped():
    cfg = plan_model_config("llama-3-8b", "auto", "cuda")
    cluster = Cluster(PRESETS["L4"], 1, 1, "pcie", 100)
    row = plan_layout(cfg, cluster, Layout(1, 1, 1, 1), Workload(1024, 128, 4096, 100000, 0.9))
    assert row.status == "ok" and row.concurrency_capped and row.concurrency < 100000


def test_plan_forks_no_stage_process():
    from pipeserve.entrypoints.launch import local_ranks

    assert local_ranks(["plan", "--model", "llama-3-70b", "--gpu", "L4", "--nodes", "1", "--gpus-per-node", "8",
                        "-tp", "8"]) == 0
