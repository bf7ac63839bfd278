"""Automatic prefix caching in the block manager, the scheduler and virtual-engine placement: no model."""

from __future__ import annotations

from helpers import fake_step, run_to_completion

from pipeserve.config import SchedulerConfig
from pipeserve.engine.block_hashing import extend_block_hashes, hash_block
from pipeserve.engine.block_manager import BlockManager
from pipeserve.engine.placement import choose_virtual_engine
from pipeserve.engine.request import Request
from pipeserve.engine.scheduler import Scheduler
from pipeserve.sampling_params import SamplingParams

BS = 4


def make_scheduler(blocks: int = 64, budget: int = 64, max_seqs: int = 8) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256)
    return Scheduler(cfg, BlockManager(blocks, BS, enable_prefix_caching=True), eos_token_ids=(2,))


def request(rid: str, prompt: list[int], max_tokens: int = 3, salt: str | None = None) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens, cache_salt=salt)


def hashes_of(tokens: list[int], salt: str | None = None) -> list[bytes]:
    return extend_block_hashes([], lambda s, n: tokens[s:s + n], len(tokens), BS, salt)


PROMPT = list(range(100, 117))  # 17 tokens: 4 full blocks and one more token


def test_hash_chains_the_prefix_and_the_salt():
    a, b = hashes_of(PROMPT), hashes_of([99] + PROMPT[1:])
    assert len(a) == 4 and all(x != y for x, y in zip(a, b, strict=True))  # a change reaches every later block
    assert hashes_of(PROMPT[:8]) == a[:2]
    assert hashes_of(PROMPT, salt="t1")[0] != a[0] != hashes_of(PROMPT, salt="t2")[0]
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])


def test_cached_blocks_are_shared_reference_counted_and_evicted_last():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    h = hashes_of(PROMPT)
    assert bm.allocate("a", 17)
    bm.cache_full_blocks("a", h)
    a_blocks = list(bm.block_tables["a"])
    assert bm.take_cached_prefix("b", h, 16) == 16 and bm.block_tables["b"] == a_blocks[:4]
    assert bm.num_used_blocks == 5  # shared, not copied
    bm.free("a")
    assert bm.num_used_blocks == 4 and bm.num_evictable_cached_blocks == 0  # b still reads them
    bm.free("b")
    assert bm.num_used_blocks == 0 and bm.num_evictable_cached_blocks == 4
    # Uncached free blocks go first: two blocks evict nothing, a third evicts one cached block.
    assert bm.allocate("c", 8) and bm.num_evictable_cached_blocks == 4
    assert bm.allocate("c", 12) and bm.num_evictable_cached_blocks == 3
    # The tail of a freed sequence is evicted first, so the start of the prefix survives.
    assert bm.longest_cached_prefix(h, 16) == 12
    bm.free("c")
    bm.reset_prefix_cache()
    assert bm.longest_cached_prefix(h, 16) == 0 and bm.num_evictable_cached_blocks == 0


def test_a_second_request_computes_only_what_is_not_cached():
    s = make_scheduler()
    s.add_request(request("a", PROMPT))
    run_to_completion(s)
    assert s.block_manager.num_used_blocks == 0  # idle: nothing in use, the prefix stays cached
    s.add_request(request("b", PROMPT[:16] + [5, 6, 7]))
    step = s.schedule()
    (entry,) = step.requests
    assert entry.start_pos == 16 and entry.token_ids == [5, 6, 7] and entry.samples
    assert entry.block_table[:4] == s.block_manager.block_tables["b"][:4]
    assert s.requests["b"].num_cached_tokens == 16
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (17 + 19, 16)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make_scheduler()
    s.add_request(request("a", PROMPT[:16]))
    run_to_completion(s)
    s.add_request(request("b", PROMPT[:16]))
    (entry,) = s.schedule().requests
    # 16 tokens = 4 full blocks, but the last token is computed for its logits: 3 blocks come from the cache.
    assert entry.start_pos == 12 and entry.token_ids == PROMPT[12:16] and entry.samples


def test_salted_requests_share_only_with_the_same_salt():
    s = make_scheduler()
    s.add_request(request("a", PROMPT, salt="tenant-1"))
    run_to_completion(s)
    for rid, salt, expect in (("b", None, 0), ("c", "tenant-2", 0), ("d", "tenant-1", 16)):
        s.add_request(request(rid, PROMPT, salt=salt))
        s.schedule()
        assert s.requests[rid].num_cached_tokens == expect, rid
        s.abort(rid)


def test_generated_tokens_are_cached_too_and_a_preempted_request_finds_its_own_blocks():
    # 4 blocks of 4 tokens: o, admitted first, needs its second block for its 5th token while a holds the
    # other three, so a (the newer) is preempted, with 6 prompt + 4 generated tokens.
    s = make_scheduler(blocks=4)
    o, a = request("o", [50], max_tokens=5), request("a", PROMPT[:6], max_tokens=8)
    s.add_request(o)
    s.add_request(a)
    while not a.num_preemptions:
        s.update(fake_step(s.schedule(), token=9))
    assert a.num_tokens == 10 and o.status.finished
    step = s.schedule()
    # its 2 full blocks (the prompt and 2 generated tokens) come back from the cache; 2 tokens are recomputed
    assert [(r.req_id, r.start_pos, r.token_ids) for r in step.requests] == [("a", 8, [9, 9])]
    assert a.num_cached_tokens == 0  # reported as at first admission
    s.update(fake_step(step, token=9))
    run_to_completion(s)
    assert a.output_token_ids == [9] * 5 + [7] * 3  # none lost, none repeated


def test_blocks_shared_by_running_requests_survive_an_abort_of_either():
    s = make_scheduler(budget=64)
    s.add_request(request("a", PROMPT, max_tokens=20))
    s.update(fake_step(s.schedule()))
    s.add_request(request("b", PROMPT, max_tokens=20))
    s.update(fake_step(s.schedule()))
    shared = s.block_manager.block_tables["b"][:4]
    assert shared == s.block_manager.block_tables["a"][:4]
    s.abort("a")
    assert set(shared) <= set(s.block_manager.block_tables["b"]) and s.block_manager.num_evictable_cached_blocks == 0
    run_to_completion(s)
    assert s.block_manager.num_used_blocks == 0


def test_reset_after_lost_kv_makes_running_requests_register_again():
    s = make_scheduler()
    s.add_request(request("a", PROMPT, max_tokens=10))
    s.update(fake_step(s.schedule()))
    s.reset_prefix_cache()
    assert s.block_manager.num_registered_blocks("a") == 0
    s.abandon_steps(lost=False)
    s.recompute_all(None)
    s.update(fake_step(s.schedule()))  # the catch-up prefill recomputes 17 + 1 tokens
    assert s.block_manager.num_registered_blocks("a") == 4
    s.add_request(request("b", PROMPT))
    s.schedule()
    assert s.requests["b"].num_cached_tokens == 16


def test_placement_follows_the_cached_prefix_within_the_load_bound():
    ves = [make_scheduler() for _ in range(2)]
    for i, s in enumerate(ves):
        s.virtual_engine = i
    ves[1].add_request(request("warm", PROMPT))
    run_to_completion(ves[1])
    placed = []
    for i in range(12):
        req = request(f"r{i}", PROMPT[:16] + [i])
        ve = choose_virtual_engine(ves, req)
        ves[ve].add_request(req)
        placed.append(ve)
    # VE 1 holds the prefix and takes requests while at most max(least + 2, 1.25 x least) are unfinished there.
    assert placed[:3] == [1, 1, 0]
    loads = [s.num_unfinished for s in ves]
    assert max(loads) <= max(min(loads) + 2, 1.25 * min(loads))
    # Once both VEs hold the prefix, requests spread by load alone.
    run_to_completion(ves[0])
    run_to_completion(ves[1])
    for i in range(8):
        req = request(f"s{i}", PROMPT[:16] + [i])
        ves[choose_virtual_engine(ves, req)].add_request(req)
    assert [s.num_unfinished for s in ves] == [4, 4]


def test_finished_and_cached_requests_leave_no_blocks_in_use():
    s = make_scheduler(blocks=12)
    for i in range(6):  # more prompts than the pool holds at once: cached blocks are evicted as needed
        s.add_request(request(f"r{i}", [i * 50 + t for t in range(17)], max_tokens=4))
    run_to_completion(s)
    assert s.block_manager.num_used_blocks == 0 and not s.requests
    assert s.block_manager.num_evictable_cached_blocks <= 12
