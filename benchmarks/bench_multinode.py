"""TP=2 across two machines vs PP=2 with one stage per machine, over a fast and a 1 Gbit/s link.

The "machines" are two network-namespace hosts on this box (pipeserve.testing_netns), one core each
(taskset): host 0 runs the engine and rank 0, host 1 runs `pipeserve worker` with rank 1. The link is the
plain veth pair, or the same capped by `tc tbf rate 1gbit`. This is the comparison pipeline parallelism
exists for: TP all-reduces twice per layer over the slow link, PP sends one activation per step.

    sudo python benchmarks/bench_multinode.py --markdown results/multinode.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import CLI, add_workload_flags, run_to_json, write_report

from pipeserve.testing_netns import NetnsCluster, netns_available

LAYOUTS = {"tp2": ["-tp", "2"], "pp2": ["-pp", "2"]}
PORT = 29711


def run(cluster: NetnsCluster, layout: str, args: argparse.Namespace) -> dict:
    cluster_flags = ["--nnodes", "2", "--master-addr", cluster.addr(0), "--master-port", str(PORT),
                     "--cluster-key", "bench"]
    head = ["bench", "throughput", *LAYOUTS[layout], *cluster_flags, "--threads-per-worker", "1",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--max-num-seqs", str(args.num_prompts),
            "--max-model-len", str(args.input_len + args.output_len), "--dtype", args.dtype]
    worker = cluster.command(1, [*CLI, "worker", "--node-rank", "1", *cluster_flags], cpus="1")
    print("running", layout, "rate", cluster.rate or "unlimited", file=sys.stderr, flush=True)
    w = subprocess.Popen(worker, stdout=sys.stderr)
    try:
        result = run_to_json(head, wrap=lambda cmd: cluster.command(0, cmd, cpus="0"))
        w.wait(timeout=120)
    finally:
        w.kill()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p, num_prompts=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rates", default="unlimited,1gbit")
    args = p.parse_args()
    problem = netns_available()
    if problem:
        sys.exit(f"bench_multinode: {problem}")
    results: dict[str, dict[str, dict]] = {}
    for rate in args.rates.split(","):
        with NetnsCluster(2, rate=None if rate == "unlimited" else rate) as cluster:
            results[rate] = {layout: run(cluster, layout, args) for layout in LAYOUTS}
    lines = [f"Workload: {args.num_prompts} prompts of {args.input_len} random tokens, {args.output_len} output "
             f"tokens, dtype {args.dtype}; two namespace hosts, one core each.", "",
             "| link | TP=2 out tok/s | PP=2 out tok/s | PP / TP | PP hand-off bytes per step |",
             "|---|---:|---:|---:|---:|"]
    for rate, r in results.items():
        tp, pp = r["tp2"]["output_tokens_per_s"], r["pp2"]["output_tokens_per_s"]
        lines.append(f"| {rate} | {tp:.1f} | {pp:.1f} | {pp / tp:.2f}x | "
                     f"{r['pp2']['stage_handoff_bytes_per_step'] / 1e3:.0f} kB |")
    lines += ["", f"command: `python benchmarks/bench_multinode.py {' '.join(sys.argv[1:])}`"]
    write_report("\n".join(lines), args.markdown, args.output_json, results)


if __name__ == "__main__":
    main()
