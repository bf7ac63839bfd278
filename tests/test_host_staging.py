"""Steps built afresh (prefill and mixed) through the stage's staging buffers (worker/host_staging.py), forced on
on the CPU where the buffers are the device's: the same inputs, logits and tokens as without them, buffers
reused across steps, and a prefill step that copies nothing to the device one tensor at a time."""

from __future__ import annotations

import pytest
import torch
from decode_driver import MIXED, HostTransfers, make_runners, run_scenario

from pipeserve.sampling_params import SamplingParams
from pipeserve.types import DecodeBatch, ScheduledRequest, SchedulerOutput
from pipeserve.worker.host_staging import HostStaging
from pipeserve.worker.request_states import RequestStates
from pipeserve.worker.step_inputs import build_model_input

BS = 4


def staged(runners):
    for runner in runners:
        runner.staging = HostStaging("cpu")
    return runners


@pytest.mark.parametrize("stages", [1, 2])
def test_staged_steps_give_the_same_logits(tiny_model, stages):
    _, plain = run_scenario(make_runners(tiny_model, stages))
    _, ours = run_scenario(staged(make_runners(tiny_model, stages)))
    assert len(ours.logits) == len(plain.logits)
    for a, b in zip(ours.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_staged_steps_sample_the_same_tokens(tiny_model):
    plain, _ = run_scenario(make_runners(tiny_model), MIXED, execute=True)
    ours, _ = run_scenario(staged(make_runners(tiny_model)), MIXED, execute=True)
    assert ours == plain


def mixed_plan() -> SchedulerOutput:
    """Two decodes, a prompt chunk past its start that samples nothing, and a scored prompt that samples."""
    params = SamplingParams(temperature=0)
    entries = [ScheduledRequest("late", list(range(10, 16)), 4, list(range(8, 14)), params),
               ScheduledRequest("scored", [3, 4, 5], 0, [20, 21], SamplingParams(temperature=0, prompt_logprobs=1),
                                samples=True)]
    decodes = DecodeBatch(["x", "y"], [7, 8], [5, 9], [1, 2])
    states = RequestStates()
    for req_id, table in (("x", [0, 1]), ("y", [2, 3, 4])):
        states.resolve(SchedulerOutput(0, 0, [ScheduledRequest(req_id, [1] * 5, 0, table, params)]))
    return states.resolve(SchedulerOutput(1, 0, entries, [], decodes))


def tensors_and_rest(inp) -> tuple[list[torch.Tensor | None], list]:
    a = inp.attn
    tensors = [inp.input_ids, inp.positions, inp.sample_rows, a.slot_mapping, a.block_tables, a.context_lens]
    tensors += [t for c in a.prefills for t in (c.context_slots, c.mask)]
    rest = [a.num_decodes, [(c.query_start, c.num_tokens, c.start_pos) for c in a.prefills], inp.sampled_requests,
            inp.prompt_scored, a.packed_prefill]
    return tensors, rest


def test_staged_inputs_equal_and_reuse_their_buffers():
    plan, staging = mixed_plan(), HostStaging("cpu")
    expected, expected_rest = tensors_and_rest(build_model_input(plan, BS))
    first = build_model_input(plan, BS, staging=staging)
    ours, rest = tensors_and_rest(first)
    assert rest == expected_rest and len(ours) == len(expected) == 10  # two chunks, one with a context and mask
    for a, b in zip(ours, expected, strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    second = build_model_input(plan, BS, staging=staging)
    assert second.input_ids.data_ptr() == first.input_ids.data_ptr()  # the same buffer, written again
    assert torch.equal(second.input_ids, expected[0])


def test_staging_grows_its_buffers():
    staging = HostStaging("cpu")
    small = staging.to_device([torch.arange(3), torch.arange(2, dtype=torch.int32)])
    big = staging.to_device([torch.arange(5000).view(50, 100), torch.ones(2, 3000, dtype=torch.int32)])
    assert [t.tolist() for t in small] == [[0, 1, 2], [0, 1]]
    assert torch.equal(big[0], torch.arange(5000).view(50, 100)) and big[1].dtype == torch.int32
    assert torch.equal(big[1], torch.ones(2, 3000, dtype=torch.int32))


class Transfers(HostTransfers):
    """HostTransfers, and also tensors made from host values straight onto a device (`torch.tensor(...,
    device=...)`: a pageable copy to the device, the kind a step built without staging makes)."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch)
        make = torch.tensor

        def counted_tensor(*args, **kwargs):
            if kwargs.get("device") is not None:
                self.calls.append("tensor(device=)")
            return make(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", counted_tensor)


def test_a_prefill_step_moves_its_inputs_in_one_staged_copy(tiny_model, monkeypatch):
    """A fresh prompt's step built through the staging buffers makes no pageable copy to the device (the
    unstaged path makes one per tensor) and reads nothing back; the forward pass and LM head neither."""
    runner = staged(make_runners(tiny_model))[0]
    states = RequestStates()
    plan = SchedulerOutput(1, 1, [ScheduledRequest("p", list(range(3, 14)), 0, list(range(8)),
                                                   SamplingParams(temperature=0), samples=True)])
    with torch.inference_mode():
        sched = states.resolve(plan)
        counter = Transfers(monkeypatch)
        inp, hidden = runner.run_model(sched, None, states.batch)
        logits = runner.model.compute_logits(hidden[inp.sample_rows])
        monkeypatch.undo()
        unstaged = Transfers(monkeypatch)
        build_model_input(sched, runner.block_size, "cpu")
        monkeypatch.undo()
    assert logits.shape[0] == 1 and counter.calls == []
    assert "tensor(device=)" in unstaged.calls  # the check sees the unstaged path's copies
