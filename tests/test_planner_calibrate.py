"""`pipeserve plan --calibrate`: the micro-benchmarks write a well-formed file, a plan uses its figures (checked
by hand), and a malformed file is one line and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

from pipeserve.planner.calibrate import CalibrationSizes, measure
from pipeserve.planner.calibration import calibrated_cpu, read_calibration, write_calibration
from pipeserve.planner.cost_model import Step, step_time
from pipeserve.planner.hardware import PRESETS
from pipeserve.planner.memory import Layout, build_stages
from pipeserve.planner.plan import Cluster, Workload, plan_layout
from tests.planner_fixtures import FIGURES, SMALL, pipeserve_plan, small

# Round figures: GEMMs at 10 GFLOP/s with one row and 100 with 65, 8 GB/s copy, a 2 GB/s link of 50 us.


@pytest.mark.slow  # the link and all-reduce benchmarks start 2, 2 and 4 processes
def test_tiny_calibration_writes_a_well_formed_file(tmp_path):
    path = str(tmp_path / "sub" / "cal.json")
    sizes = CalibrationSizes(hidden=32, rows=(4, 1), copy_mib=1, link_mib=1, seconds=0.02)
    write_calibration(path, measure(torch.float32, sizes))
    data = read_calibration(path)
    assert [rows for rows, _ in data["gemm_tflops"]] == [1, 4]
    assert all(rate > 0 for _, rate in data["gemm_tflops"])
    assert data["copy_gbps"] > 0 and data["link_gbps"] > 0 and data["link_latency_us"] > 0
    assert data["dtype"] == "float32" and data["threads"] == 1 and data["gemm_hidden"] == 32
    assert data["cpu_model"] and data["torch"] == torch.__version__ and data["measured"]
    assert set(data["allreduce_busy_us"]) == set(data["allreduce_cpu_us"]) == {"2", "4"}
    assert [b for b, _ in data["allreduce_busy_us"]["2"]] == [8 * 32 * 4, 512 * 32 * 4]  # a decode's, a chunk's
    assert data["cores"] >= 1 and data["layers"] == {}


def test_calibrated_figures_replace_the_stated_ones_by_hand(tmp_path):
    path = str(tmp_path / "cal.json")
    write_calibration(path, FIGURES)
    device = calibrated_cpu(path, read_calibration(path), "float32")
    assert device.flops_per_s(1) == pytest.approx(1e10)
    assert device.flops_per_s(33) == pytest.approx(5.5e10)  # halfway between 1 and 65 rows
    assert device.flops_per_s(512) == pytest.approx(1e11)  # flat beyond the last point
    cluster = Cluster(device, 1, 2, "pcie", 1)
    links = cluster.links()
    assert links.intra_bps == pytest.approx(2e9) and links.latency(False) == pytest.approx(50e-6)

    cfg = small(torch.float32)
    (stage,) = build_stages(cfg, 1, [6])
    seqs, ctx = 8, 16 + 16 / 2  # the decode step at concurrency 8: 16 in, 16 out
    layer = 64 * (8 + 2 * 2) * 8 + 8 * 8 * 64 + 3 * 64 * 128 + 2 * 64
    flops = 2 * seqs * 6 * layer + 4 * seqs * 6 * ctx * 8 * 8 + 2 * seqs * 64 * 100
    read = stage.weight_bytes + seqs * ctx * stage.kv_bytes_per_token + seqs * stage.kv_bytes_per_token
    rate = (0.01 + 0.09 * 7 / 64) * 1e12  # 8 rows
    t_dev = max(flops / rate, read / 8e9)
    t = step_time(cfg, device, Layout(1, 1, 1, 1), [stage], links, Step(seqs, seqs, ctx, seqs))
    assert t.busy_sum == pytest.approx(t_dev)
    row = plan_layout(cfg, cluster, Layout(1, 1, 1, 1), Workload(16, 16, 256, seqs, 0.9))
    assert row.status == "ok" and row.concurrency == seqs
    assert row.tpot_ms == pytest.approx((t_dev + device.host_ms / 1e3) * 1e3)  # one VE: the step's latency
    stated = plan_layout(cfg, Cluster(PRESETS["cpu"], 1, 2, "pcie", 1), Layout(1, 1, 1, 1),
                         Workload(16, 16, 256, seqs, 0.9))
    assert stated.tpot_ms != pytest.approx(row.tpot_ms)


def test_the_command_reads_the_file_back(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    path = str(tmp_path / "cal.json")
    write_calibration(path, FIGURES)
    r = pipeserve_plan("--model", str(tmp_path), "--gpu", "cpu", "--dtype", "float32", "--gpus-per-node", "2",
                       "--input-len", "16", "--output-len", "16", "--max-model-len", "256", "--concurrency", "8",
                       "--calibration-file", path, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["assumptions"][0] == f"calibrated figures from {path} (measured 2026-01-02 03:04 UTC)"
    assert out["cluster"]["device"]["hbm_gbps"] == 8.0 and out["cluster"]["device"]["eff_flops"] == 1.0
    cfg = small(torch.float32)
    device = calibrated_cpu(path, FIGURES, "float32")
    expected = plan_layout(cfg, Cluster(device, 1, 2, "pcie", 100), Layout(1, 2, 1, 2), Workload(16, 16, 256, 8, 0.9))
    (pp2,) = [row for row in out["layouts"] if (row["tp"], row["pp"]) == (1, 2)]
    assert pp2["output_tok_s"] == pytest.approx(expected.output_tok_s)


@pytest.mark.parametrize("content,expected", [
    ('{"copy_gbps": 8,', "not valid JSON"),
    (json.dumps({**FIGURES, "copy_gbps": -1}), "copy_gbps must be a number > 0, got -1"),
    (json.dumps({**FIGURES, "gemm_tflops": [[4, 0.1], [1, 0.2]]}), "gemm_tflops must be a list of [rows, TFLOP/s]"),
    (json.dumps({**FIGURES, "dtype": "bfloat16"}), "measured bfloat16 GEMMs, the plan uses float32"),
])
def test_a_malformed_calibration_file_is_one_line_and_exit_2(tmp_path, content, expected):
    path = tmp_path / "cal.json"
    path.write_text(content)
    r = pipeserve_plan("--model", "llama-3-8b", "--gpu", "cpu", "--dtype", "float32", "--calibration-file", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], r.stderr
