"""Scheduler and block manager, driven by fake step outputs: no model involved."""

from __future__ import annotations

import pytest
from helpers import fake_step, run_to_completion

from pipeserve.config import SchedulerConfig
from pipeserve.engine.block_manager import BlockManager
from pipeserve.engine.request import Request, RequestStatus
from pipeserve.engine.scheduler import Scheduler
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import ScheduledRequest, SchedulerOutput
from pipeserve.worker.request_states import RequestStates

EOS = 2


def make_scheduler(blocks: int = 64, block_size: int = 4, budget: int = 16, max_seqs: int = 8,
                   chunked: bool = True, max_len: int = 256) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                          enable_chunked_prefill=chunked)
    return Scheduler(cfg, BlockManager(blocks, block_size), eos_token_ids=(EOS,))


def request(rid: str, prompt_len: int, max_tokens: int = 4, **params) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **params), max_tokens)


def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 5) and len(bm.block_tables["a"]) == 2
    assert bm.allocate("a", 8) and len(bm.block_tables["a"]) == 2  # still fits
    assert not bm.allocate("b", 9)  # needs 3, only 2 free: nothing taken
    assert bm.num_free_blocks == 2
    bm.free("a")
    assert bm.num_free_blocks == 4 and "a" not in bm.block_tables


def test_chunked_prefill_splits_long_prompt_under_budget():
    s = make_scheduler(budget=16)
    s.add_request(request("a", 40))
    first = s.schedule()
    assert first.num_tokens == 16 and not first.requests[0].samples
    s.update(fake_step(first))
    second = s.schedule()
    assert second.requests[0].start_pos == 16 and second.num_tokens == 16
    s.update(fake_step(second))
    third = s.schedule()
    assert third.num_tokens == 8 and third.requests[0].samples  # last chunk samples


def test_decodes_and_prefill_chunks_share_a_step():
    s = make_scheduler(budget=16)
    s.add_request(request("a", 3, max_tokens=10))
    s.update(fake_step(s.schedule()))  # a's prefill
    s.add_request(request("b", 30))
    step = s.schedule()
    assert step.decodes.req_ids == ["a"] and step.decodes.start_pos == [3]  # a's decode, as a column
    assert [(r.req_id, r.num_tokens) for r in step.requests] == [("b", 15)] and step.kind == "mixed"


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    s = make_scheduler(budget=32, chunked=False)
    s.add_request(request("a", 20))
    s.add_request(request("b", 20))
    step = s.schedule()
    assert [r.req_id for r in step.requests] == ["a"] and step.num_tokens == 20


def test_max_num_seqs_limits_running_batch():
    s = make_scheduler(max_seqs=2, budget=64)
    for i in range(4):
        s.add_request(request(str(i), 4))
    assert [r.req_id for r in s.schedule().requests] == ["0", "1"]


def test_requests_finish_on_length_eos_and_stop_token():
    s = make_scheduler()
    s.add_request(request("len", 4, max_tokens=3))
    s.add_request(request("stop", 4, max_tokens=10, stop_token_ids=[7]))
    s.add_request(request("ign", 4, max_tokens=3, ignore_eos=True))
    reqs = dict(s.requests)
    out = s.schedule()
    s.update(fake_step(out, token=7))
    assert reqs["stop"].status == RequestStatus.FINISHED_STOPPED and reqs["stop"].stop_reason == 7
    while s.has_work():
        s.update(fake_step(s.schedule(), token=EOS))
    assert reqs["len"].status == RequestStatus.FINISHED_STOPPED  # EOS ends it
    assert reqs["ign"].status == RequestStatus.FINISHED_LENGTH and len(reqs["ign"].output_token_ids) == 3
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_a_stop_string_the_output_side_finds_ends_the_request_through_the_scheduler():
    """The output side only answers whether the text now ends with a stop string; the scheduler finishes the
    request: a stop string completed by the last token allowed is a stop, not a length; a stop token comes
    first (it adds no text, so the output side is not asked)."""
    s = make_scheduler()
    early, last, token = (request("early", 4, max_tokens=5, stop=["ab"]), request("last", 4, max_tokens=2, stop=["ab"]),
                          request("token", 4, max_tokens=5, stop=["ab"], stop_token_ids=[7]))
    asked = []

    def find_stop_string(req: Request) -> str | None:  # the text "ends with" the stop string at these lengths
        asked.append(req.request_id)
        return "ab" if len(req.output_token_ids) == {"early": 1, "last": 2}.get(req.request_id) else None

    for r in (early, last, token):
        s.add_request(r)
    while s.has_work():
        s.update(fake_step(s.schedule()), find_stop_string)
    assert (early.status, early.stop_reason, len(early.output_token_ids)) == (RequestStatus.FINISHED_STOPPED, "ab", 1)
    assert (last.status, last.stop_reason, len(last.output_token_ids)) == (RequestStatus.FINISHED_STOPPED, "ab", 2)
    assert (token.status, token.stop_reason) == (RequestStatus.FINISHED_STOPPED, 7)
    assert asked == ["early", "last", "last"]
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks and not s.requests


def test_preemption_recomputes_and_loses_no_tokens():
    # 6 blocks of 4 tokens: two requests of 8 prompt + 8 output tokens (4 blocks each) cannot both run.
    s = make_scheduler(blocks=6, block_size=4, budget=32)
    a, b = request("a", 8, max_tokens=8), request("b", 8, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    steps = run_to_completion(s)
    assert s.num_preemptions >= 1 and b.num_preemptions >= 1
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    # After preemption b recomputes prompt + outputs so far in one prefill, then samples the next token.
    recompute = [r for st in steps for r in st.requests if r.req_id == "b" and r.start_pos == 0][-1]
    assert recompute.token_ids[8:] == [7] * (len(recompute.token_ids) - 8)
    assert s.block_manager.num_free_blocks == 6


def test_abort_frees_blocks_and_ignores_in_flight_result():
    s = make_scheduler()
    s.add_request(request("a", 10))
    out = s.schedule()
    assert s.block_manager.num_used_blocks == 3
    s.abort("a")
    assert s.block_manager.num_used_blocks == 0
    assert s.update(fake_step(out)) == [] and not s.has_work()


def test_prefill_chunks_are_planned_while_earlier_ones_are_in_flight():
    s = make_scheduler(budget=16)
    s.add_request(request("a", 40))
    chunks = [s.schedule() for _ in range(4)]  # three chunks, then nothing until the sampling one returns
    assert [c.requests[0].start_pos for c in chunks[:3]] == [0, 16, 32]
    assert [len(c.requests[0].token_ids) for c in chunks[:3]] == [16, 16, 8]
    assert [c.requests[0].samples for c in chunks[:3]] == [False, False, True]
    assert chunks[3].is_empty and s.num_steps_in_flight == 3
    with pytest.raises(AssertionError):
        s.update(fake_step(chunks[1]))  # results are applied in planning order
    for c in chunks[:3]:
        s.update(fake_step(c))
    req = s.requests["a"]
    assert req.num_computed_tokens == 40 and req.output_token_ids == [7] and req.num_inflight_tokens == 0
    decode = s.schedule()  # a decode of a request the stages know: a row of the columnar decodes
    assert not decode.requests and decode.decodes.req_ids == ["a"] and decode.kind == "decode"
    assert (decode.decodes.start_pos, decode.decodes.token_ids) == ([40], [7])
    assert decode.decodes.new_blocks == {"a": s.block_manager.block_tables["a"][10:]}  # token 41 opens block 11
    assert s.schedule().is_empty  # the decode waits for its token


def test_abort_with_chunks_in_flight_frees_blocks_and_drops_their_results():
    s = make_scheduler(budget=16)
    s.add_request(request("a", 40))
    chunks = [s.schedule(), s.schedule()]
    s.abort("a")
    assert s.block_manager.num_used_blocks == 0
    assert [s.update(fake_step(c)) for c in chunks] == [[], []] and not s.has_work()


def test_a_preempted_request_replanned_ignores_its_stale_step():
    s = make_scheduler(blocks=3, block_size=4, budget=8)
    s.add_request(request("a", 4))
    s.add_request(request("b", 12))
    first = s.schedule()  # a: its whole prompt (1 block); b: tokens 0..3 (1 block)
    # b's next chunk needs two more blocks, one is free: b, the newest, is preempted, its first chunk still
    # in flight, and planned again from the start in the same step.
    second = s.schedule()
    b = s.requests["b"]
    assert [(r.req_id, r.start_pos, len(r.token_ids)) for r in second.requests] == [("b", 0, 8)]
    assert b.num_preemptions == 1
    s.update(fake_step(first))  # b's part of it is stale
    assert s.requests["a"].output_token_ids == [7]
    assert (b.num_computed_tokens, b.num_inflight_tokens) == (0, 8)
    s.update(fake_step(second))
    assert (b.num_computed_tokens, b.num_inflight_tokens) == (8, 0)


def test_block_tables_cover_every_computed_token():
    """The incremental plans, resolved as a stage does, give every request whole tables that cover its
    context; plans after the first carry only new blocks; the stage forgets every finished request."""
    s = make_scheduler(blocks=10, block_size=4, budget=8)  # small enough to preempt
    for i in range(5):
        s.add_request(request(str(i), 3 + 5 * i, max_tokens=6))
    stage = RequestStates()
    while s.has_work():
        step = s.schedule()
        appended = [r.block_table for r in step.requests if not r.new] + list(step.decodes.new_blocks.values())
        assert all(len(blocks) <= 2 for blocks in appended)  # only the blocks an 8-token step appends
        resolved = stage.resolve(step).requests
        assert {r.req_id for r in resolved} == {r.req_id for r in step.requests} | set(step.decodes.req_ids)
        for whole in resolved:
            assert whole.block_table == s.block_manager.block_tables[whole.req_id]
            assert len(whole.block_table) * 4 >= whole.context_len
            assert (whole.sampling_params is not None) == whole.samples
        s.update(fake_step(step))
    assert s.num_preemptions > 0
    # What finished in the last step is dropped with the VE's next step (an empty plan is never sent).
    s.add_request(request("next", 3))
    stage.resolve(s.schedule())
    assert len(stage) == 1


def test_a_new_generation_resends_every_request_whole():
    s = make_scheduler()
    s.add_request(request("a", 4, max_tokens=5))
    stage = RequestStates()
    s.update(fake_step(stage.resolve(s.schedule(), generation=0)))
    decode = s.schedule()  # a decode of a request the stages know: never sent whole
    assert decode.decodes.req_ids == ["a"] and not decode.requests
    s.abandon_steps(lost=False)
    s.forget_stage_state()  # what the engine does when the group's generation changes
    step = s.schedule()
    assert step.requests[0].new and step.requests[0].block_table == s.block_manager.block_tables["a"]
    resolved = stage.resolve(step, generation=1)  # the stage's state of generation 0 is gone
    assert resolved.requests[0].block_table == s.block_manager.block_tables["a"]
    with pytest.raises(RuntimeError, match="never sent whole"):
        RequestStates().resolve(_continuing(step), generation=1)


def _continuing(step: SchedulerOutput) -> SchedulerOutput:
    r = step.requests[0]
    return SchedulerOutput(step.step_id + 1, 0, [ScheduledRequest(r.req_id, [7], r.context_len, [], None, new=False)])


def test_recompute_all_catches_up_only_the_stages_that_lost_their_kv():
    s = make_scheduler(budget=64)
    reqs = [request(str(i), 5, max_tokens=6) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    s.update(fake_step(s.schedule()))  # all three prefilled, one token each
    blocks = {r.request_id: list(s.block_manager.block_tables[r.request_id]) for r in reqs}
    s.schedule()
    s.abandon_steps(lost=False)  # planned, never ran: nobody becomes a suspect
    assert s.recompute_all(last_stage=0) == 3 and s.num_recomputed == 3 and s.num_recomputed_tokens == 15
    assert [r.request_id for r in s.running] == ["0", "1", "2"]  # they keep their place and their blocks
    assert {r.request_id: s.block_manager.block_tables[r.request_id] for r in reqs} == blocks
    catch_up = s.schedule()
    # The 5 prompt tokens again, on stage 0 only (stage 1 still holds their KV); no sampling yet.
    assert [(r.token_ids, r.start_pos, r.last_stage, r.sampling_params) for r in catch_up.requests] == \
        [(list(range(10, 15)), 0, 0, None)] * 3
    assert catch_up.for_stage(1).is_empty and catch_up.for_stage(0) is catch_up
    s.update(fake_step(catch_up))
    resume = s.schedule()  # then the decode of the token already produced, on every stage
    # (as columnar decodes: those always run on every stage)
    assert (resume.decodes.token_ids, resume.decodes.start_pos, resume.requests) == ([7] * 3, [5] * 3, [])
    s.update(fake_step(resume))
    run_to_completion(s)
    assert all(r.output_token_ids == [7] * 6 for r in reqs)  # nothing lost, nothing repeated


def test_a_second_recovery_during_a_catch_up_widens_it():
    s = make_scheduler(budget=4)
    r = request("a", 8, max_tokens=4)
    s.add_request(r)
    for _ in range(2):
        s.update(fake_step(s.schedule()))  # the 8 prompt tokens, in two chunks of 4
    s.recompute_all(last_stage=0)  # stage 0 replaced: stages 1.. still hold 8 tokens of KV
    s.update(fake_step(s.schedule()))  # caught up 4 of 8 on stage 0
    s.recompute_all(last_stage=2)  # now stage 2 is replaced too
    assert (r.num_computed_tokens, r.kv_held_tokens, r.catch_up_stage) == (0, 8, 2)
    chunks = []
    while r.catch_up_stage is not None:
        step = s.schedule()
        chunks.append((step.requests[0].start_pos, step.requests[0].num_tokens, step.requests[0].last_stage))
        s.update(fake_step(step))
    assert chunks == [(0, 4, 2), (4, 4, 2)]


def test_recompute_on_every_stage_is_one_prefill_up_to_the_next_sample():
    s = make_scheduler(budget=64)
    r = request("a", 5, max_tokens=4)
    s.add_request(r)
    s.update(fake_step(s.schedule()))
    s.recompute_all(last_stage=None)  # the last stage was replaced: nothing to skip anywhere
    step = s.schedule()
    assert [(q.token_ids, q.start_pos, q.last_stage) for q in step.requests] == [(list(range(10, 15)) + [7], 0, None)]
    assert step.requests[0].samples


def test_preempting_a_request_that_catches_up_recomputes_it_on_every_stage():
    # 3 blocks of 4 tokens, 2 tokens a step: after a recovery, x (the older) catches up, then decodes while a
    # catches up one token a step; x's 9th token needs the third block, a's, and a (the newer) is preempted.
    s = make_scheduler(blocks=3, block_size=4, budget=2)
    x, a = request("x", 2, max_tokens=10), request("a", 4, max_tokens=4)
    s.add_request(x)
    s.add_request(a)
    while not a.output_token_ids:
        s.update(fake_step(s.schedule()))
    s.recompute_all(last_stage=0)
    while not a.num_preemptions:
        assert a.catch_up_stage == 0 and a.status == RequestStatus.RUNNING
        s.update(fake_step(s.schedule()))
    # Its blocks, and the KV later stages held in them, are gone: it is computed again on every stage.
    assert a.catch_up_stage is None and a.kv_held_tokens == 0
    steps = run_to_completion(s)
    first = next(r for step in steps for r in step.requests if r.req_id == "a")
    assert (first.start_pos, first.last_stage, first.new) == (0, None, True)
    assert x.output_token_ids == [7] * 10 and a.output_token_ids == [7] * 4


def test_suspects_of_a_lost_step_run_one_per_step_and_a_repeat_offender_fails_alone():
    s = make_scheduler(budget=64)
    reqs = {rid: request(rid, 4, max_tokens=4) for rid in "abc"}
    for r in reqs.values():
        s.add_request(r)
    s.schedule()
    assert s.abandon_steps() == []  # the step was lost: a, b, c are suspects
    s.recompute_all(last_stage=1)
    first = s.schedule()
    assert [r.req_id for r in first.requests] == ["a"]  # one suspect per step
    assert s.abandon_steps() == [reqs["a"]]  # lost again with a in it: a is failed on its own
    assert reqs["a"].status == RequestStatus.FINISHED_ABORTED and "a" not in s.requests
    s.recompute_all(last_stage=1)
    second = s.schedule()
    assert [r.req_id for r in second.requests] == ["b"]
    s.update(fake_step(second))  # a completed step clears b
    assert reqs["b"].num_failed_steps == 0
    run_to_completion(s)
    assert reqs["b"].output_token_ids == [7] * 4 and reqs["c"].output_token_ids == [7] * 4
