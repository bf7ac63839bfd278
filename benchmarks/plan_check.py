"""`pipeserve plan`'s predictions beside measured runs, out of sample: calibrate first (micro-benchmarks only),
then plan every case from the stored figures, then run each case and put the two side by side.

Cases (one thread per rank, dense weights, float32):
* default: the embedded model (or `--model`) at PP=1, PP=2, TP=2 and PP=2 x TP=2, `pipeserve bench throughput`
  with the reference mix's lengths (1024 in / 128 out), 8 prompts;
* `--netns` (root): PP=2 vs TP=2 across two network-namespace hosts (one core each) on a 1 Gbit/s link, as
  benchmarks/bench_multinode.py runs them;
* `--scale`: bench_scale.py's 1.5 B random Llama at PP=1, 2 and 4 (8 prompts of 128 in / 16 out, 256 KV blocks).

Scored: output tokens/s (predicted / measured) and each stage's weights + KV pool (the busiest rank's tensor
bytes, predicted against what the rank reports); peak RSS is printed beside them, not scored.

    python benchmarks/plan_check.py [--netns] [--scale] [--reuse-calibration] --markdown results/plan_check.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import CLI, run_to_json, write_report

MIB = 1 << 20
EMBEDDED = {"pp1": (1, 1), "pp2": (1, 2), "tp2": (2, 1), "pp2tp2": (2, 2)}  # case: (TP, PP)
SCALE = {"scale_pp1": (1, 1), "scale_pp2": (1, 2), "scale_pp4": (1, 4)}
NETNS = {"netns_pp2": (1, 2), "netns_tp2": (2, 1)}
COMMON = ["--threads-per-worker", "1", "--quantization", "none", "--dtype", "float32"]


def measure(argv: list[str], wrap=lambda cmd: cmd) -> dict[str, Any] | None:
    """One `pipeserve bench` run's JSON; a run that fails (a stage that could not start on a busy machine) is
    tried once more, then reported as failed rather than ending the whole check."""
    for attempt in (1, 2):
        try:
            return run_to_json(argv, wrap=wrap)
        except subprocess.CalledProcessError as exc:
            print(f"run failed (attempt {attempt}): exit status {exc.returncode}", file=sys.stderr, flush=True)
    return None


def plan_rows(model: str, calibration: str, extra: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    """`pipeserve plan --json` from the stored calibration: its rows by (TP, PP)."""
    out = subprocess.run([*CLI, "plan", "--model", model, "--gpu", "cpu", "--dtype", "float32",
                          "--calibration-file", calibration, "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return {(r["tp"], r["pp"]): r for r in json.loads(out)["layouts"] if r["status"] == "ok"}


def calibrate(model: str, calibration: str, max_tp: int) -> None:
    """`plan --calibrate` for the model's decoder layer at TP sizes up to `max_tp` (the runs come later)."""
    subprocess.run([*CLI, "plan", "--calibrate", "--model", model, "--gpu", "cpu", "--dtype", "float32",
                    "--nodes", "1", "--gpus-per-node", str(max_tp), "--calibration-file", calibration,
                    "--input-len", "16", "--output-len", "16", "--max-model-len", "256"],
                   check=True, stdout=subprocess.DEVNULL)


def stage_memory(measured: dict[str, Any]) -> list[dict[str, int]]:
    """Each stage's TP rank 0 (the busiest: it holds the extra KV group, as the plan counts)."""
    ranks = [m for m in measured["rank_memory"] if m.get("tp_rank", 0) == 0]
    return sorted(ranks, key=lambda m: m["stage"])


def compare(case: str, predicted: dict[str, Any], measured: dict[str, Any] | None) -> dict[str, Any]:
    if measured is None:
        return {"case": case, "predicted_tok_s": predicted["output_tok_s"], "failed": True}
    stages = stage_memory(measured)
    pred_mem = [w + k for w, k in zip(predicted["stage_weights_bytes"], predicted["stage_kv_bytes"], strict=True)]
    meas_mem = [m["weights_bytes"] + m["kv_bytes"] for m in stages]
    return {"case": case, "predicted_tok_s": predicted["output_tok_s"],
            "measured_tok_s": measured["output_tokens_per_s"],
            "ratio": predicted["output_tok_s"] / measured["output_tokens_per_s"],
            "predicted_stage_bytes": pred_mem, "measured_stage_bytes": meas_mem,
            "memory_error": max(abs(p / m - 1) for p, m in zip(pred_mem, meas_mem, strict=True)),
            "peak_rss_bytes": [m["peak_rss_bytes"] for m in stages],
            "bottleneck": predicted["bottleneck"], "machine_cpu_s": measured.get("machine_cpu_s"),
            "elapsed_s": measured["elapsed_s"]}


def embedded_cases(args: argparse.Namespace, calibration: str, cases: list[str]) -> list[dict[str, Any]]:
    work = ["--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--max-model-len", str(args.max_model_len)]
    rows = plan_rows(args.model, calibration, [*work, "--nodes", "1", "--gpus-per-node", "4",
                                              "--concurrency", str(args.num_prompts)])
    out = []
    for case in cases:
        tp, pp = EMBEDDED[case]
        print(f"running {case}", file=sys.stderr, flush=True)
        measured = measure(["bench", "throughput", "--model", args.model, "-tp", str(tp), "-pp", str(pp),
                                "--num-prompts", str(args.num_prompts), *work, *COMMON])
        out.append(compare(case, rows[(tp, pp)], measured))
    return out


def netns_cases(args: argparse.Namespace, calibration: str) -> list[dict[str, Any]]:
    from pipeserve.testing_netns import NetnsCluster, netns_available

    problem = netns_available()
    if problem:
        sys.exit(f"plan_check --netns: {problem}")
    length = args.input_len + args.output_len
    work = ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--max-model-len", str(length)]
    rows = plan_rows(args.model, calibration, [*work, "--nodes", "2", "--gpus-per-node", "1",
                                              "--inter-node-gbps", "1", "--concurrency", str(args.num_prompts)])
    out = []
    for case, (tp, pp) in NETNS.items():
        with NetnsCluster(2, rate="1gbit") as cluster:
            flags = ["--nnodes", "2", "--master-addr", cluster.addr(0), "--master-port", "29713",
                     "--cluster-key", "plan-check"]
            print(f"running {case}", file=sys.stderr, flush=True)
            worker = subprocess.Popen(cluster.command(1, [*CLI, "worker", "--node-rank", "1", *flags], cpus="1"),
                                      stdout=sys.stderr)
            try:
                measured = measure(
                    ["bench", "throughput", "--model", args.model, "-tp", str(tp), "-pp", str(pp), *flags,
                     "--num-prompts", str(args.num_prompts), "--max-num-seqs", str(args.num_prompts), *work, *COMMON],
                    wrap=lambda cmd: cluster.command(0, cmd, cpus="0"))
                worker.wait(timeout=120)
            finally:
                worker.kill()
        out.append(compare(case, rows[(tp, pp)], measured))
    return out


def scale_cases(args: argparse.Namespace, calibration: str) -> list[dict[str, Any]]:
    from bench_scale import write_checkpoint

    folder = tempfile.mkdtemp(prefix="pipeserve-plan-check-")
    try:
        print(f"writing the 1.5 B checkpoint to {folder}", file=sys.stderr, flush=True)
        write_checkpoint(folder)
        calibrate(folder, calibration, 1)  # its decoder layer (the file keeps the other shapes' costs)
        work = ["--input-len", "128", "--output-len", "16", "--max-model-len", "1024", "--num-kv-blocks", "256"]
        rows = plan_rows(folder, calibration, [*work, "--nodes", "1", "--gpus-per-node", "4", "--concurrency", "8"])
        out = []
        for case, (tp, pp) in SCALE.items():
            print(f"running {case}", file=sys.stderr, flush=True)
            measured = measure(["bench", "throughput", "--model", folder, "-pp", str(pp), "--num-prompts", "8",
                                    *work, *COMMON])
            out.append(compare(case, rows[(tp, pp)], measured))
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: list[dict[str, Any]], header: str) -> str:
    def mib(values: list[int]) -> str:
        return " / ".join(f"{v / MIB:,.0f}" for v in values)

    lines = [header, "", "| case | predicted out tok/s | measured | predicted / measured | bottleneck (plan) | "
             "weights + KV per stage, predicted (MiB) | measured (MiB) | worst error | peak RSS per stage (MiB) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        if r.get("failed"):
            lines.append(f"| {r['case']} | {r['predicted_tok_s']:.2f} | failed twice | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['predicted_tok_s']:.2f} | {r['measured_tok_s']:.2f} | {r['ratio']:.2f} | "
                     f"{r['bottleneck']} | {mib(r['predicted_stage_bytes'])} | {mib(r['measured_stage_bytes'])} | "
                     f"{r['memory_error']:.1%} | {mib(r['peak_rss_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cases", default=",".join(EMBEDDED), help=f"of {', '.join(EMBEDDED)} (empty: none)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--netns", action="store_true", help="also PP=2 vs TP=2 on two namespace hosts (root)")
    p.add_argument("--scale", action="store_true", help="also the 1.5 B model at PP=1/2/4")
    p.add_argument("--calibration-file", default=None, help="default: a fresh file in a temporary folder")
    p.add_argument("--reuse-calibration", action="store_true", help="plan from --calibration-file as it is")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(EMBEDDED))
    if unknown:
        sys.exit(f"plan_check: unknown case(s) {', '.join(unknown)}; known: {', '.join(EMBEDDED)}")
    folder = tempfile.mkdtemp(prefix="pipeserve-calibration-")
    calibration = args.calibration_file or os.path.join(folder, "calibration-cpu.json")
    if args.reuse_calibration and not os.path.exists(calibration):
        sys.exit(f"plan_check: --reuse-calibration needs an existing --calibration-file, not {calibration!r}")
    start = time.time()
    try:
        if not args.reuse_calibration:
            print("calibrating (micro-benchmarks only)", file=sys.stderr, flush=True)
            calibrate(args.model, calibration, 2)
        results = embedded_cases(args, calibration, cases) if cases else []
        if args.netns:
            results += netns_cases(args, calibration)
        if args.scale:
            results += scale_cases(args, calibration)
        with open(calibration) as f:
            figures = json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    header = (f"`pipeserve plan` against measured runs: {args.model}, {args.num_prompts} prompts of {args.input_len} "
              f"in / {args.output_len} out (1.5 B: 8 of 128 / 16), one thread per rank, float32, dense weights; "
              f"{figures['cpu_model']}, {figures['cores']} cores, torch {figures['torch']}; calibrated "
              f"{figures['measured']}; {time.time() - start:.0f} s in all, load average at the end "
              f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    text = report(results, header) + f"\n\ncommand: `python benchmarks/plan_check.py {' '.join(sys.argv[1:])}`"
    write_report(text, args.markdown, args.output_json, {"results": results, "calibration": figures})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
