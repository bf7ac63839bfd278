"""The host's share of one decode step at PP=1: what the engine process does per step besides the forward pass.

One stream of a tiny random Llama decodes N tokens in this process (UniProcExecutor, CPU). On a GPU the forward
pass of a decode step is one graph replay, so everything else the host does per step is time the GPU may wait
for: planning the step, resolving the plan on the stage, filling the decode inputs, the sampler's host part,
applying the token, waking the listener, the event loop. Everything runs in the main thread, so times are that
thread's CPU time (steady on a shared machine, where wall time is not). Reported, in microseconds per decode
step:
* the whole step (CPU time of a request of 1 + N tokens minus one of 1 token, over the N extra steps);
* the model forward (the layers, the final norm and the LM head), measured by timing those calls;
* the host overhead: the difference;
* inclusive time of the main host sections (nested sections are counted in their parents too).
The sections are timed by wrapping their functions, which adds about a microsecond per call; the first three
lines come from runs where only the forward is wrapped (the run with the least host time of `--repeats`).

    PYTHONPATH=. python benchmarks/profile_host_step.py [--tokens 256] [--vocab 320] [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipeserve import LLM, SamplingParams  # noqa: E402
from tests.helpers import make_tiny_llama  # noqa: E402

# (module, owner, attribute) of each host section; owner None: a module-level function
SECTIONS = {
    "engine: Scheduler.schedule": ("pipeserve.engine.scheduler", "Scheduler", "schedule"),
    "engine: Scheduler.update": ("pipeserve.engine.scheduler", "Scheduler", "update"),
    "engine: publish outputs": ("pipeserve.engine.async_engine", "AsyncEngine", "_publish"),
    "stage: StageWorker.run_step (all below)": ("pipeserve.worker.worker", "StageWorker", "run_step"),
    "stage: RequestStates.resolve": ("pipeserve.worker.request_states", "RequestStates", "resolve"),
    "stage: decode inputs (fill + copy)": ("pipeserve.worker.step_inputs", "DecodeInputs", "fill"),
    "stage: sampler (all below)": ("pipeserve.layers.sampler", "Sampler", "__call__"),
    "stage: sampler step params": ("pipeserve.layers.sampler", None, "build_step_params"),
    "stage: sampler to host": ("pipeserve.layers.sampler", None, "to_host"),
}
FORWARD = [("pipeserve.models.llama", "LlamaForCausalLM", "forward"),
           ("pipeserve.models.llama", "LlamaForCausalLM", "compute_logits")]


class Timers:
    """Inclusive seconds and calls per named function, installed by wrapping the functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, name: str, module: str, owner: str | None, attr: str) -> None:
        target = importlib.import_module(module)
        if owner is not None:
            target = getattr(target, owner)
        original = getattr(target, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.thread_time() - start
                self.calls[name] += 1

        setattr(target, attr, timed)
        self._undo.append((target, attr, original))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def undo(self) -> None:
        for target, attr, original in reversed(self._undo):
            setattr(target, attr, original)
        self._undo.clear()


def run_seconds(llm: LLM, prompt: list[int], tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.thread_time()
    llm.generate([{"prompt_token_ids": prompt}], params)
    return time.thread_time() - start


def per_step_us(llm: LLM, prompt: list[int], tokens: int, repeats: int, timers: Timers,
                key: str | None = None) -> tuple[float, dict[str, float]]:
    """Of `repeats` runs, the one where the step minus section `key` (else the step) is least: microseconds
    per decode step, and each timed section's microseconds per step."""
    best, step_us, sections = float("inf"), 0.0, {}
    for _ in range(repeats):
        short = run_seconds(llm, prompt, 1)
        timers.reset()
        long = run_seconds(llm, prompt, 1 + tokens)
        step = (long - short) / tokens * 1e6
        per = {k: v / tokens * 1e6 for k, v in timers.seconds.items()}
        score = step - per.get(key, 0.0) if key else step
        if score < best:
            best, step_us, sections = score, step, per
    return step_us, sections


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=320,
                   help="vocabulary of the tiny model: small, so the CPU argmax (a GPU kernel) costs little")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llama(os.path.join(tmp, "m"), vocab_size=args.vocab)
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            llm = LLM(path, device="cpu", dtype="float32", max_model_len=args.tokens + 64, max_num_seqs=8,
                      enable_prefix_caching=False, threads_per_worker=1)
        prompt = list(range(3, 19))
        with llm:
            run_seconds(llm, prompt, 8)  # warm-up
            fwd = Timers()
            for module, owner, attr in FORWARD:
                fwd.wrap("forward", module, owner, attr)
            step_us, forward = per_step_us(llm, prompt, args.tokens, args.repeats, fwd, "forward")
            fwd.undo()
            timers = Timers()
            for name, where in SECTIONS.items():
                timers.wrap(name, *where)
            _, sections = per_step_us(llm, prompt, args.tokens, args.repeats, timers)
            timers.undo()
    forward_us = forward.get("forward", 0.0)
    result = {"step_us": step_us, "forward_us": forward_us, "host_us": step_us - forward_us, "sections": sections}
    print(f"one stream, {args.tokens} decode steps, tiny Llama (vocab {args.vocab}) on the CPU, PP=1")
    print(f"{'whole decode step':45s} {step_us:8.1f} us")
    print(f"{'model forward (layers, norm, LM head)':45s} {forward_us:8.1f} us")
    print(f"{'host overhead (the rest)':45s} {step_us - forward_us:8.1f} us")
    print("host sections (inclusive, timed by wrappers):")
    for name in SECTIONS:
        print(f"  {name:43s} {sections.get(name, 0.0):8.1f} us")
    return result


if __name__ == "__main__":
    main()
