"""`pipeserve plan`'s predictions beside measured runs, out of sample: calibrate (micro-benchmarks only), run
every case, calibrate again into a second file, then plan every case from each file and put the mean of the
two predictions beside the measured run. This VM's speed drifts by up to 30% over minutes: a calibration taken
only before the runs can land in a slow spell while they run in a fast one, or the other way round; one
before and one after bracket them. Neither calibration sees the runs.

Cases (one thread per rank, dense weights, float32):
* default: the embedded model (or `--model`) at PP=1, PP=2, TP=2 and PP=2 x TP=2, `pipeserve bench throughput`
  with the reference mix's lengths (1024 in / 128 out), 8 prompts;
* `--netns` (root): PP=2 vs TP=2 across two network-namespace hosts (one core each) on a 1 Gbit/s link, as
  benchmarks/bench_multinode.py runs them;
* `--scale`: bench_scale.py's 1.5 B random Llama at PP=1, 2 and 4 (8 prompts of 128 in / 16 out, 256 KV blocks).

Scored: output tokens/s (predicted / measured) and each stage's weights + KV pool (the busiest rank's tensor
bytes, predicted against what the rank reports); peak RSS is printed beside them, not scored.

    python benchmarks/plan_check.py [--netns] [--scale] [--single-calibration] --markdown results/plan_check.md
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
from dataclasses import dataclass
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


@dataclass
class Case:
    """One measured run, and what `pipeserve plan` needs to predict it: the model and the plan's flags."""

    name: str
    tp: int
    pp: int
    model: str
    plan_args: tuple[str, ...]
    measured: dict[str, Any] | None


def plan_rows(model: str, calibration: str, extra: tuple[str, ...]) -> dict[tuple[int, int], dict[str, Any]]:
    """`pipeserve plan --json` from the stored calibration: its rows by (TP, PP)."""
    out = subprocess.run([*CLI, "plan", "--model", model, "--gpu", "cpu", "--dtype", "float32",
                          "--calibration-file", calibration, "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return {(r["tp"], r["pp"]): r for r in json.loads(out)["layouts"] if r["status"] == "ok"}


def calibrate(model: str, calibration: str, max_tp: int) -> None:
    """`plan --calibrate` for the model's decoder layer at TP sizes up to `max_tp` (the file keeps the other
    shapes' costs)."""
    subprocess.run([*CLI, "plan", "--calibrate", "--model", model, "--gpu", "cpu", "--dtype", "float32",
                    "--nodes", "1", "--gpus-per-node", str(max_tp), "--calibration-file", calibration,
                    "--input-len", "16", "--output-len", "16", "--max-model-len", "256"],
                   check=True, stdout=subprocess.DEVNULL)


def stage_memory(measured: dict[str, Any]) -> list[dict[str, int]]:
    """Each stage's TP rank 0 (the busiest: it holds the extra KV group, as the plan counts)."""
    ranks = [m for m in measured["rank_memory"] if m.get("tp_rank", 0) == 0]
    return sorted(ranks, key=lambda m: m["stage"])


def compare(case: Case, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The case's predictions from each calibration (their mean scored) beside its measured run."""
    before = rows[0]
    predicted = sum(r["output_tok_s"] for r in rows) / len(rows)
    out = {"case": case.name, "predicted_tok_s": predicted,
           "predicted_per_calibration": [r["output_tok_s"] for r in rows]}
    measured = case.measured
    if measured is None:
        return {**out, "failed": True}
    stages = stage_memory(measured)
    pred_mem = [w + k for w, k in zip(before["stage_weights_bytes"], before["stage_kv_bytes"], strict=True)]
    meas_mem = [m["weights_bytes"] + m["kv_bytes"] for m in stages]
    return {**out, "measured_tok_s": measured["output_tokens_per_s"],
            "ratio": predicted / measured["output_tokens_per_s"],
            "predicted_stage_bytes": pred_mem, "measured_stage_bytes": meas_mem,
            "memory_error": max(abs(p / m - 1) for p, m in zip(pred_mem, meas_mem, strict=True)),
            "peak_rss_bytes": [m["peak_rss_bytes"] for m in stages],
            "bottleneck": before["bottleneck"], "machine_cpu_s": measured.get("machine_cpu_s"),
            "elapsed_s": measured["elapsed_s"]}


def embedded_runs(args: argparse.Namespace, cases: list[str]) -> list[Case]:
    work = ("--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--max-model-len", str(args.max_model_len))
    plan_args = (*work, "--nodes", "1", "--gpus-per-node", "4", "--concurrency", str(args.num_prompts))
    out = []
    for case in cases:
        tp, pp = EMBEDDED[case]
        print(f"running {case}", file=sys.stderr, flush=True)
        measured = measure(["bench", "throughput", "--model", args.model, "-tp", str(tp), "-pp", str(pp),
                            "--num-prompts", str(args.num_prompts), *work, *COMMON])
        out.append(Case(case, tp, pp, args.model, plan_args, measured))
    return out


def netns_runs(args: argparse.Namespace) -> list[Case]:
    from pipeserve.testing_netns import NetnsCluster, netns_available

    problem = netns_available()
    if problem:
        sys.exit(f"plan_check --netns: {problem}")
    length = args.input_len + args.output_len
    work = ("--input-len", str(args.input_len), "--output-len", str(args.output_len), "--max-model-len", str(length))
    plan_args = (*work, "--nodes", "2", "--gpus-per-node", "1", "--inter-node-gbps", "1",
                 "--concurrency", str(args.num_prompts))
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
        out.append(Case(case, tp, pp, args.model, plan_args, measured))
    return out


def scale_runs(folder: str) -> list[Case]:
    """The 1.5 B model (its checkpoint already in `folder`) at PP=1, 2 and 4."""
    work = ("--input-len", "128", "--output-len", "16", "--max-model-len", "1024", "--num-kv-blocks", "256")
    plan_args = (*work, "--nodes", "1", "--gpus-per-node", "4", "--concurrency", "8")
    out = []
    for case, (tp, pp) in SCALE.items():
        print(f"running {case}", file=sys.stderr, flush=True)
        measured = measure(["bench", "throughput", "--model", folder, "-pp", str(pp), "--num-prompts", "8",
                            *work, *COMMON])
        out.append(Case(case, tp, pp, folder, plan_args, measured))
    return out


def calibrate_all(model: str, scale_folder: str | None, calibration: str, max_tp: int) -> None:
    print(f"calibrating into {calibration} (micro-benchmarks only)", file=sys.stderr, flush=True)
    calibrate(model, calibration, max_tp)
    if scale_folder:
        calibrate(scale_folder, calibration, 1)


def predicted_rows(cases: list[Case], calibration: str) -> list[dict[str, Any]]:
    """Each case's plan row from one calibration file (one `plan` call per model and flags)."""
    plans: dict[tuple[str, tuple[str, ...]], dict[tuple[int, int], dict[str, Any]]] = {}
    for c in cases:
        if (c.model, c.plan_args) not in plans:
            plans[(c.model, c.plan_args)] = plan_rows(c.model, calibration, c.plan_args)
    return [plans[(c.model, c.plan_args)][(c.tp, c.pp)] for c in cases]


def report(results: list[dict[str, Any]], header: str) -> str:
    def mib(values: list[int]) -> str:
        return " / ".join(f"{v / MIB:,.0f}" for v in values)

    when = "before / after" if len(results[0]["predicted_per_calibration"]) == 2 else "before"
    lines = [header, "", f"| case | predicted out tok/s (calibrated {when} the runs) | mean | measured | "
             "predicted / measured | bottleneck (plan) | weights + KV per stage, predicted (MiB) | measured (MiB) | "
             "worst error | peak RSS per stage (MiB) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        both = " / ".join(f"{v:.2f}" for v in r["predicted_per_calibration"])
        if r.get("failed"):
            lines.append(f"| {r['case']} | {both} | {r['predicted_tok_s']:.2f} | failed twice | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {both} | {r['predicted_tok_s']:.2f} | {r['measured_tok_s']:.2f} | "
                     f"{r['ratio']:.2f} | "
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
    p.add_argument("--single-calibration", action="store_true",
                   help="calibrate only before the runs (faster; exposed to the machine's drift)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(EMBEDDED))
    if unknown:
        sys.exit(f"plan_check: unknown case(s) {', '.join(unknown)}; known: {', '.join(EMBEDDED)}")
    folder = tempfile.mkdtemp(prefix="pipeserve-plan-check-")
    before, after = (os.path.join(folder, f"calibration-{when}.json") for when in ("before", "after"))
    start = time.time()
    try:
        scale_folder = None
        if args.scale:
            scale_folder = os.path.join(folder, "llama-1.5b")
            print(f"writing the 1.5 B checkpoint to {scale_folder}", file=sys.stderr, flush=True)
            from bench_scale import write_checkpoint

            write_checkpoint(scale_folder)
        # the TP=2 rank shape is measured only where a case runs it
        max_tp = 2 if args.netns or any(EMBEDDED[c][0] > 1 for c in cases) else 1
        calibrate_all(args.model, scale_folder, before, max_tp)
        runs = embedded_runs(args, cases) if cases else []
        if args.netns:
            runs += netns_runs(args)
        if scale_folder:
            runs += scale_runs(scale_folder)
        files = [before] if args.single_calibration else [before, after]
        if not args.single_calibration:
            calibrate_all(args.model, scale_folder, after, max_tp)
        per_file = [predicted_rows(runs, path) for path in files]
        results = [compare(c, list(rows)) for c, *rows in zip(runs, *per_file, strict=True)]
        figures = []
        for path in files:
            with open(path) as f:
                figures.append(json.load(f))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    header = (f"`pipeserve plan` against measured runs: {args.model}, {args.num_prompts} prompts of {args.input_len} "
              f"in / {args.output_len} out (1.5 B: 8 of 128 / 16), one thread per rank, float32, dense weights; "
              f"{figures[0]['cpu_model']}, {figures[0]['cores']} cores, torch {figures[0]['torch']}; calibrated "
              f"{' and '.join(f['measured'] for f in figures)}; {time.time() - start:.0f} s in all, "
              f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    text = report(results, header) + f"\n\ncommand: `python benchmarks/plan_check.py {' '.join(sys.argv[1:])}`"
    write_report(text, args.markdown, args.output_json, {"results": results, "calibrations": figures})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
