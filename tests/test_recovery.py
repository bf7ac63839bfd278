"""A stage that dies, raises or hangs is replaced, and every request finishes with the tokens it would have
produced without the fault. Faults are injected at a chosen point: after request 0 has k tokens."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time

import pytest
from helpers import assert_greedy_match, leftover_bookkeeping

from pipeserve import LLM, SamplingParams
from pipeserve.executor.formation import StageFailure

pytestmark = pytest.mark.slow

PROMPTS = [list(range(3 + i, 7 + i + (7 * i) % 40)) for i in range(16)]
# Half greedy, half seeded sampling at temperature 1: both must come out of a recovery unchanged.
PARAMS = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) if i % 2 == 0 else
          SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=24, ignore_eos=True) for i in range(16)]


def generate(llm: LLM, on_output=None) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, on_output=on_output)
    return [o.outputs[0].token_ids for o in outs]


def assert_identical(hf_model, got: list[list[int]], expected: list[list[int]]) -> None:
    """Seeded requests exactly; greedy ones exactly except past a near-tie in HF's own logits."""
    for prompt, params, ours, ref in zip(PROMPTS, PARAMS, got, expected, strict=True):
        if params.temperature == 0:
            assert_greedy_match(hf_model, prompt, ours, ref)
        else:
            assert ours == ref


class SignalAt:
    """`on_output` callback: sends `sig` to `rank`'s process once request 0 has `after` tokens."""

    def __init__(self, llm: LLM, rank: int, sig: int = signal.SIGKILL, after: int = 8):
        self.llm, self.rank, self.sig, self.after = llm, rank, sig, after
        self.pid: int | None = None

    def __call__(self, index: int, out) -> None:
        if index == 0 and self.pid is None and len(out.outputs[0].token_ids) >= self.after:
            self.pid = self.llm.engine.executor.launcher.pid(self.rank)
            os.kill(self.pid, self.sig)


def assert_no_process_left(executor) -> None:
    assert all(executor.launcher.pid(r) is None for r in range(executor.layout.world_size))


@pytest.fixture(scope="module")
def pp2(tiny_models):
    llm = LLM(tiny_models["gqa"], dtype="float32", pipeline_parallel_size=2, threads_per_worker=1,
              max_model_len=256, step_timeout_s=4, max_stage_restarts=10, record_steps=True)
    yield llm, generate(llm)  # the fault-free reference, from the same engine
    llm.shutdown()


def prefix_cache_hits(llm: LLM) -> int:
    return sum(s.prefix_cache_hits for s in llm.engine.stats())


def test_kill_stage1_at_pp2_loses_nothing(pp2, hf_models):
    """Prefix caching through the recovery: this run starts from the reference run's cached prompts; the
    replaced stage loses that KV, so the cache is dropped and the next run computes (and caches) afresh."""
    llm, reference = pp2
    kill = SignalAt(llm, rank=1)
    hits = prefix_cache_hits(llm)
    got = generate(llm, kill)
    assert kill.pid is not None
    assert prefix_cache_hits(llm) > hits  # the prompts came from the cache before the kill
    assert_identical(hf_models["gqa"], got, reference)
    # Nothing of the requests that lived through the recovery stays behind, in the engine or either stage.
    assert leftover_bookkeeping(llm.engine) == {}
    executor = llm.engine.executor
    assert executor.recoveries.restarts_by_stage[1] >= 1
    assert llm.engine.num_recomputed() > 0
    assert executor.launcher.pid(1) not in (None, kill.pid)  # a new process, the old one gone
    hits = prefix_cache_hits(llm)
    assert generate(llm) == got  # and the healed pipeline keeps serving, from blocks cached since the recovery
    assert prefix_cache_hits(llm) > hits


def test_a_stage_interrupted_on_its_own_keeps_serving(pp2, hf_models):
    """SIGINT reaching a stage alone (`pkill -INT` matching it, say) is not a failure: the engine stops its
    stages itself, so they ignore it, and nothing is recovered."""
    llm, reference = pp2
    before = len(llm.engine.executor.recoveries.spans)
    interrupt = SignalAt(llm, rank=1, sig=signal.SIGINT)
    got = generate(llm, interrupt)
    assert interrupt.pid is not None
    assert_identical(hf_models["gqa"], got, reference)
    assert len(llm.engine.executor.recoveries.spans) == before
    assert llm.engine.executor.launcher.pid(1) == interrupt.pid  # the same process, still serving


def test_sigstopped_stage_is_caught_by_the_step_deadline(pp2, hf_models):
    llm, reference = pp2
    before = len(llm.engine.executor.recoveries.spans)
    stop = SignalAt(llm, rank=0, sig=signal.SIGSTOP)
    got = generate(llm, stop)
    assert_identical(hf_models["gqa"], got, reference)
    executor = llm.engine.executor
    span = executor.recoveries.spans[before]
    assert "got no result within 4 s (--step-timeout-s)" in span.cause
    assert span.replaced_stages == [0]
    # Stage 1 kept its KV: it skipped the catch-up that the new stage 0 computed.
    stats = executor.collect_stats()
    tokens = [sum(r.num_tokens for r in s["records"] if r.start >= span.end) for s in stats]
    assert tokens[0] > tokens[1] > 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(stop.pid, 0)  # the stopped process was killed, not left behind


@pytest.mark.parametrize("layout", ["pp3_middle", "pp2_tp2_one_tp_rank"])
def test_kill_one_rank_in_other_layouts(layout, tiny_models, hf_models):
    family, kwargs, victim = {
        "pp3_middle": ("linear_rope", dict(pipeline_parallel_size=3), 1),
        "pp2_tp2_one_tp_rank": ("gqa", dict(pipeline_parallel_size=2, tensor_parallel_size=2), 3),
    }[layout]
    llm = LLM(tiny_models[family], dtype="float32", threads_per_worker=1, max_model_len=256, **kwargs)
    executor = llm.engine.executor
    try:
        reference = generate(llm)
        kill = SignalAt(llm, rank=victim)
        got = generate(llm, kill)
        assert kill.pid is not None
        assert_identical(hf_models[family], got, reference)
        assert executor.recoveries.restarts_by_stage == {1: 1}
    finally:
        llm.shutdown()
    assert_no_process_left(executor)


def test_restarts_exhausted_is_a_clear_error_and_leaves_no_process(tiny_model):
    """A stage that dies every time it starts: after --max-stage-restarts attempts the failure is final."""
    llm = LLM(tiny_model, dtype="float32", pipeline_parallel_size=2, threads_per_worker=1, max_model_len=256,
              max_stage_restarts=2)
    launcher = llm.engine.executor.launcher
    stop = threading.Event()

    def kill_every_stage1_process() -> None:
        while not stop.is_set():
            pid = launcher.pid(1)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):  # it died between the two calls
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_every_stage1_process, daemon=True)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(StageFailure, match="pipeline stage 1 .*giving up after 2 restarts within 600 s"):
            generate(llm)
        assert time.monotonic() - start < 120
        with pytest.raises(StageFailure):
            llm.engine.check_health()
    finally:
        stop.set()
        killer.join()
        executor = llm.engine.executor
        llm.shutdown()
    assert_no_process_left(executor)


def test_replacement_that_cannot_load_its_stage_fails_clearly(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    llm = LLM(str(model), dtype="float32", pipeline_parallel_size=2, threads_per_worker=1, max_model_len=256)
    executor = llm.engine.executor
    try:
        shutil.rmtree(model)  # the checkpoint is gone: no replacement can load it
        with pytest.raises(StageFailure, match="recovery failed: pipeline stage 1 failed to start: "):
            generate(llm, SignalAt(llm, rank=1))
    finally:
        llm.shutdown()
    assert_no_process_left(executor)
