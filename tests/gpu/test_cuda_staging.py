"""Prefill and mixed steps through the pinned staging buffers on CUDA (worker/host_staging.py), run by
`make test-gpu` (each skips without CUDA): the same logits as copying each tensor on its own, and a prefill
step issued without any synchronisation (its tokens reach the host later, through PendingStep)."""

from __future__ import annotations

import pytest
import torch
from decode_driver import issue_without_sync, make_runners, run_scenario

from pipeserve.sampling_params import SamplingParams
from pipeserve.types import ScheduledRequest, SchedulerOutput
from pipeserve.worker.request_states import RequestStates
from pipeserve.worker.sampled_ids import PendingStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("stages", [1, 2])
def test_staged_steps_equal_unstaged(tiny_model, stages):
    unstaged = make_runners(tiny_model, stages, device="cuda")
    for runner in unstaged:
        runner.staging = None
    _, plain = run_scenario(unstaged)
    _, ours = run_scenario(make_runners(tiny_model, stages, device="cuda"))
    for a, b in zip(ours.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_prefill_step_is_issued_without_synchronising(tiny_model):
    runner = make_runners(tiny_model, 1, device="cuda")[0]
    assert runner.staging is not None
    states = RequestStates()
    for step, start in ((1, 0), (2, 8)):  # a fresh prompt, then a chunk past its start
        plan = SchedulerOutput(step, 1, [ScheduledRequest("p", list(range(3 + start, 11 + start)), start,
                                                          list(range(8)), SamplingParams(temperature=0),
                                                          samples=True)])
        with torch.inference_mode():
            pending = issue_without_sync(runner, states.resolve(plan), states.batch)
        assert isinstance(pending, PendingStep) and list(pending.result().sampled) == ["p"]
