"""What a dead stage costs: the embedded model at PP=2, one stage killed halfway through a run.

Runs the same workload (random-token prompts, 1024 in / 128 out by default) on one engine, alternating a
fault-free run and a run in which stage 1's process gets SIGKILL once half of the output tokens exist.
Reports, per faulted run:

  detect     kill -> the engine notices (the stage's connection closes)
  recover    detection -> the new generation of the group runs (replacement started, weights loaded)
  to token   kill -> the first token any request receives once the pipeline runs again
  recompute  the rest of the extra time: redoing the prefill of every request that was in flight

and the throughput of the faulted run as a ratio to the fault-free run next to it.

    python benchmarks/bench_recovery.py --markdown results/recovery.md --output-json results/recovery.json
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import sys
import time

from common import add_workload_flags, write_report

from pipeserve import LLM, SamplingParams


class KillHalfway:
    """`on_output` callback: kills a rank when half the output tokens exist; notes when tokens arrive after."""

    def __init__(self, llm: LLM, rank: int, total_tokens: int):
        self.llm, self.rank, self.half = llm, rank, total_tokens // 2
        self.counts: dict[int, int] = {}
        self.kill_time: float | None = None
        self.arrivals_after: list[float] = []

    def __call__(self, index: int, out) -> None:
        self.counts[index] = len(out.outputs[0].token_ids)
        if self.kill_time is not None:
            self.arrivals_after.append(time.time())
        elif sum(self.counts.values()) >= self.half:
            self.kill_time = time.time()
            os.kill(self.llm.engine.executor.launcher.procs[self.rank].pid, signal.SIGKILL)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, kill: KillHalfway | None) -> dict:
    engine = llm.engine
    recomputed = sum(s.num_recomputed_tokens for s in engine.schedulers)
    start = time.time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, on_output=kill)
    elapsed = time.time() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
              "token_ids": [o.outputs[0].token_ids for o in outs]}
    if kill is not None:
        span = engine.executor.recoveries.spans[-1]
        first_after = min(t for t in kill.arrivals_after if t >= span.end)  # earlier ones left before the kill
        result.update(kill_to_detect_s=span.start - kill.kill_time, recover_s=span.end - span.start,
                      kill_to_first_token_s=first_after - kill.kill_time,
                      recomputed_tokens=sum(s.num_recomputed_tokens for s in engine.schedulers) - recomputed)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p, num_prompts=16)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--victim-rank", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    runs: dict[str, list[dict]] = {"fault_free": [], "faulted": []}
    with LLM(args.model, dtype=args.dtype, pipeline_parallel_size=2, threads_per_worker=1,
             max_model_len=args.input_len + args.output_len, max_num_seqs=args.num_prompts,
             max_stage_restarts=args.repeats + 1) as llm:
        llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=4))  # warm-up
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
            print("fault-free run", file=sys.stderr, flush=True)
            runs["fault_free"].append(run(llm, prompts, params, None))
            print("faulted run", file=sys.stderr, flush=True)
            kill = KillHalfway(llm, args.victim_rank, args.num_prompts * args.output_len)
            runs["faulted"].append(run(llm, prompts, params, kill))
    text = report(args, runs)
    for r in runs["fault_free"] + runs["faulted"]:
        del r["token_ids"]  # compared in the report; too bulky for the JSON
    write_report(text, args.markdown, args.output_json, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> str:
    med = lambda key, kind="faulted": statistics.median(r[key] for r in runs[kind])  # noqa: E731
    free_s, faulted_s = med("seconds", "fault_free"), med("seconds")
    ratio = med("output_tokens_per_s") / med("output_tokens_per_s", "fault_free")
    extra = faulted_s - free_s
    lost = med("kill_to_detect_s") + med("recover_s")
    same = all(f["token_ids"] == g["token_ids"] for f, g in zip(runs["fault_free"], runs["faulted"], strict=True))
    lines = [
        f"Workload: the embedded model at PP=2 (one thread per stage), {args.num_prompts} prompts of "
        f"{args.input_len} random tokens, {args.output_len} output tokens each, greedy; stage "
        f"{args.victim_rank} killed (SIGKILL) when half the output tokens exist; median of {args.repeats} "
        f"alternating pairs of runs.",
        "",
        "| run | seconds | output tok/s |",
        "|---|---:|---:|",
        f"| fault-free | {free_s:.1f} | {med('output_tokens_per_s', 'fault_free'):.1f} |",
        f"| stage {args.victim_rank} killed halfway | {faulted_s:.1f} | {med('output_tokens_per_s'):.1f} |",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| faulted / fault-free throughput | {ratio:.2f}x |",
        f"| kill -> detected | {med('kill_to_detect_s'):.2f} s |",
        f"| detected -> pipeline running again (recovery) | {med('recover_s'):.2f} s |",
        f"| kill -> first token after the recovery | {med('kill_to_first_token_s'):.2f} s |",
        f"| extra time of the faulted run | {extra:.1f} s |",
        f"| of which detection + recovery | {lost:.1f} s |",
        f"| of which recomputation of lost work | {extra - lost:.1f} s ({med('recomputed_tokens'):.0f} tokens "
        f"recomputed) |",
        f"| token ids identical to the fault-free run | {'yes' if same else 'NO'} |",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; command: "
        f"`python benchmarks/bench_recovery.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
