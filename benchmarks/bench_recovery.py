"""What a dead stage costs: the embedded model at PP=2, one stage killed halfway through a run.

Runs the same workload (random-token prompts, 1024 in / 128 out by default) on one engine, alternating a
fault-free run with runs in which one stage's process gets SIGKILL once half of the output tokens exist:
stage 1 (the last: every stage recomputes the lost KV) and stage 0 (stage 1 keeps its KV and skips the
catch-up). Reports, per kind of faulted run:

  detect     kill -> the engine notices (the stage's connection closes)
  recover    detection -> the new generation of the group runs (replacement started, weights loaded)
  to token   kill -> the first token any request receives once the pipeline runs again
  recompute  the rest of the extra time: redoing the prefill of every running request on the stages up to
             the replaced one

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
            os.kill(self.llm.engine.executor.launcher.pid(self.rank), signal.SIGKILL)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, kill: KillHalfway | None) -> dict:
    engine = llm.engine
    recomputed = sum(s.num_recomputed_tokens for s in engine.stats())
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
                      recomputed_tokens=sum(s.num_recomputed_tokens for s in engine.stats()) - recomputed)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p, num_prompts=16)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--victims", default="1,0", help="the stages to kill, one faulted run each per round")
    args = p.parse_args()
    victims = [int(v) for v in args.victims.split(",")]
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    runs: dict[str, list[dict]] = {"fault_free": [], **{f"stage{v}": [] for v in victims}}
    with LLM(args.model, dtype=args.dtype, pipeline_parallel_size=2, threads_per_worker=1,
             max_model_len=args.input_len + args.output_len, max_num_seqs=args.num_prompts,
             max_stage_restarts=args.repeats * len(victims) + 1) as llm:
        llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=4))  # warm-up
        for _ in range(args.repeats):  # alternate, so drift in machine load hits every kind alike
            print("fault-free run", file=sys.stderr, flush=True)
            runs["fault_free"].append(run(llm, prompts, params, None))
            for v in victims:
                print(f"run with stage {v} killed", file=sys.stderr, flush=True)
                kill = KillHalfway(llm, v, args.num_prompts * args.output_len)
                runs[f"stage{v}"].append(run(llm, prompts, params, kill))
    text = report(args, victims, runs)
    for r in (r for kind in runs.values() for r in kind):
        del r["token_ids"]  # compared in the report; too bulky for the JSON
    write_report(text, args.markdown, args.output_json, runs)


def report(args: argparse.Namespace, victims: list[int], runs: dict[str, list[dict]]) -> str:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    free_s, free_tps = med("fault_free", "seconds"), med("fault_free", "output_tokens_per_s")
    kinds = [f"stage{v}" for v in victims]
    header = " | ".join(f"stage {v} killed" for v in victims)
    lines = [
        f"Workload: the embedded model at PP=2 (one thread per stage), {args.num_prompts} prompts of "
        f"{args.input_len} random tokens, {args.output_len} output tokens each, greedy; a stage killed (SIGKILL) "
        f"when half the output tokens exist; median of {args.repeats} alternating rounds (fault-free, "
        f"{', '.join(f'stage {v} killed' for v in victims)}) on one engine.",
        "",
        f"| measure | fault-free | {header} |",
        "|---|---:|" + "---:|" * len(victims),
        f"| seconds | {free_s:.1f} | " + " | ".join(f"{med(k, 'seconds'):.1f}" for k in kinds) + " |",
        f"| output tok/s | {free_tps:.1f} | " + " | ".join(f"{med(k, 'output_tokens_per_s'):.1f}" for k in kinds)
        + " |",
        "| throughput / fault-free | 1.00x | " + " | ".join(f"{med(k, 'output_tokens_per_s') / free_tps:.2f}x"
                                                      for k in kinds) + " |",
    ]
    rows = [("kill -> detected (s)", lambda k: f"{med(k, 'kill_to_detect_s'):.2f}"),
            ("detected -> pipeline running again: recovery (s)", lambda k: f"{med(k, 'recover_s'):.2f}"),
            ("kill -> first token after the recovery (s)", lambda k: f"{med(k, 'kill_to_first_token_s'):.2f}"),
            ("extra time of the run (s)", lambda k: f"{med(k, 'seconds') - free_s:.1f}"),
            ("of which detection + recovery (s)", lambda k: f"{_lost(runs, k):.1f}"),
            ("of which recomputing lost work (s)", lambda k: f"{med(k, 'seconds') - free_s - _lost(runs, k):.1f}"),
            ("tokens recomputed (on the stages up to the replaced one)",
             lambda k: f"{med(k, 'recomputed_tokens'):.0f}"),
            ("token ids identical to the fault-free run", lambda k: "yes" if _identical(runs, k) else "NO")]
    lines += [f"| {label} | | " + " | ".join(cell(k) for k in kinds) + " |" for label, cell in rows]
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; command: "
              f"`python benchmarks/bench_recovery.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines)


def _lost(runs: dict[str, list[dict]], kind: str) -> float:
    return statistics.median(r["kill_to_detect_s"] + r["recover_s"] for r in runs[kind])


def _identical(runs: dict[str, list[dict]], kind: str) -> bool:
    return all(f["token_ids"] == g["token_ids"] for f, g in zip(runs["fault_free"], runs[kind], strict=True))


if __name__ == "__main__":
    main()
