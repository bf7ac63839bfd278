"""With the default flags (float32 asked for, everything else as it comes), a request's tokens do not depend on
what shares its steps: probe prompts alone and inside a batch of others, and streams recovered after
`kill -9` of a stage, give the fault-free, run-alone tokens, greedy and seeded. Two runs may part only at a
near-tie in HF's own logits (tests/helpers.py), and greedy tokens match HF transformers the same way."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import assert_greedy_match, assert_sampled_match, hf_embedded_model, hf_greedy, rank_pid

from pipeserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PLACES = ["Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Perth", "Quito", "Dakar"]
GOODS = ["copper", "tea", "wool", "salt", "glass", "rice", "cotton", "timber"]


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)


def logbook(title: str, days: int) -> str:
    """A long, distinct, natural text: `days` numbered lines of a ship's log."""
    lines = [f"Day {d}: the ship left {PLACES[(d * 3) % 8]} at {d % 12 + 1} o'clock with {17 * d % 90 + 10} crates "
             f"of {GOODS[(d * 5) % 8]} and sailed for {PLACES[(d * 7 + 1) % 8]}." for d in range(days)]
    return f"{title}\n" + "\n".join(lines) + "\nDay"


# Probes, each with its own sampling: short prompts, and two longer than one step's token budget. The seeds are
# ones whose draws `--quantization auto` changes between a probe alone and in the batch (its kernels depend on
# the step's number of rows), so the test catches a default that is not batch-invariant.
PROBES = [("The capital of France is", GREEDY),
          ("def fibonacci(n):\n    ", GREEDY),
          ("Pipeline parallelism splits a model into", seeded(13)),
          ("Once upon a time, in a quiet village,", seeded(14)),
          ("Explain photosynthesis to a child.", seeded(17)),
          (logbook("The log of the Marianne.", 20), GREEDY),
          (logbook("Notes kept aboard the Albatross.", 22), seeded(13))]
# Other requests: two long ones ahead of the probes take most of the first step's budget, so the long probes'
# prompts are cut into other chunks than alone; shorter outputs change the number of rows as they finish.
OTHERS = [(logbook("Cargo manifest of the Dolphin.", 7), seeded(21)),
          (logbook("Harbour register of Genoa.", 8), GREEDY),
          ("Write a haiku about the sea.", SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)),
          ("List three prime numbers:", SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)),
          ("The recipe for bread begins with", seeded(22))]


@pytest.fixture(scope="module")
def hf_model():
    return hf_embedded_model()


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], salt: str, on_output=None) -> list[list[int]]:
    # Each run gets its own cache salt: no run reads another's cached prompt blocks, so every run computes its
    # prompts in its own chunks (prefix caching stays at its default, on).
    outs = llm.generate([{"prompt_token_ids": p, "cache_salt": salt} for p in prompts], params, on_output=on_output)
    return [o.outputs[0].token_ids for o in outs]


def test_probes_alone_and_in_a_batch_agree(hf_model):
    with LLM(dtype="float32") as llm:
        tok = llm.get_tokenizer()
        probes = [tok.encode(text) for text, _ in PROBES]
        others = [tok.encode(text) for text, _ in OTHERS]
        budget = llm.config.scheduler.max_num_batched_tokens
        assert min(len(probes[-2]), len(probes[-1])) > budget > len(others[0]) + len(others[1])
        params = [p for _, p in PROBES]
        alone = [run(llm, [prompt], [p], f"alone-{i}")[0] for i, (prompt, p) in enumerate(zip(probes, params,
                                                                                                strict=True))]
        batch = run(llm, others[:2] + probes + others[2:], [p for _, p in OTHERS[:2] + PROBES + OTHERS[2:]], "batch")
    in_batch = batch[2:2 + len(PROBES)]
    for prompt, p, ours, ref in zip(probes, params, in_batch, alone, strict=True):
        assert_sampled_match(hf_model, prompt, p, ours, ref)
    for prompt, p, ref in zip(probes, params, alone, strict=True):  # and the default greedy outputs are HF's
        if p.greedy:
            assert_greedy_match(hf_model, prompt, ref, hf_greedy(hf_model, prompt, MAX_TOKENS))


class KillStage:
    """`on_output` callback: kill -9 of stage `rank` once request 0 has `after` tokens."""

    def __init__(self, rank: int, after: int):
        self.rank, self.after, self.pid = rank, after, None

    def __call__(self, index: int, out) -> None:
        if index == 0 and self.pid is None and len(out.outputs[0].token_ids) >= self.after:
            self.pid = rank_pid(os.getpid(), self.rank)
            os.kill(self.pid, signal.SIGKILL)


def test_recovered_streams_equal_the_fault_free_ones(hf_model):
    """PP=2: stage 1 is killed mid-run; the requests it held are recomputed from their prompts and the tokens
    they had, in other batch shapes than the first time, and must continue as they would have."""
    with LLM(dtype="float32", pipeline_parallel_size=2) as llm:
        tok = llm.get_tokenizer()
        streams = PROBES[:-2] + OTHERS[3:]  # the short ones, greedy or seeded (unseeded draws differ by design)
        prompts = [tok.encode(text) for text, _ in streams]
        params = [p for _, p in streams]
        reference = run(llm, prompts, params, "fault-free")
        kill = KillStage(rank=1, after=MAX_TOKENS // 3)
        recovered = run(llm, prompts, params, "recovered", on_output=kill)
        assert kill.pid is not None
        assert rank_pid(os.getpid(), 1) != kill.pid  # a replacement serves stage 1
    for prompt, p, ours, ref in zip(prompts, params, recovered, reference, strict=True):
        assert_sampled_match(hf_model, prompt, p, ours, ref)
