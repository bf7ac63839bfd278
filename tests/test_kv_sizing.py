"""KV pool sizing: the arithmetic that turns stage memory profiles into a block count, the overrides, the
start-up log line, the handshake against a recording executor, the dummy profiling steps on CPU, and a CPU
engine that never profiles (the GPU side is tests/gpu/test_cuda_kv_sizing.py)."""

from __future__ import annotations

import pytest
import torch

from pipeserve import LLM
from pipeserve.distributed.stage import StageInfo
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.engine.kv_sizing import blocks_per_ve, kv_capacity_line, size_kv_cache
from pipeserve.executor.base import Executor
from pipeserve.loader.model_config import load_model_config
from pipeserve.models.rank_shapes import kv_bytes_per_block
from pipeserve.types import MemoryProfile
from pipeserve.worker.kv_cache import allocate_kv_caches
from pipeserve.worker.memory_profile import dummy_decode, dummy_prefill, run_dummy_step
from pipeserve.worker.model_runner import ModelRunner

GIB = 1 << 30


def profile(device="gpu0", total=100 * GIB, used=10 * GIB, activation=2 * GIB, graphs=GIB, per_block=GIB // 1024):
    return MemoryProfile(device, total, used, activation, graphs, per_block)


def within_fraction(ranks: list[MemoryProfile], fraction: float, blocks: int, num_ve: int) -> bool:
    """Whether `blocks` per VE (plus each VE's scratch block) on every rank keeps the device within fraction."""
    kv = (blocks + 1) * num_ve * sum(p.kv_bytes_per_block for p in ranks)
    step = sum(p.activation_bytes + p.graph_bytes for p in ranks)
    return max(p.used_bytes for p in ranks) + step + kv <= ranks[0].total_bytes * fraction


# ---- the arithmetic ------------------------------------------------------------------------------------

def test_one_rank_gets_what_the_fraction_leaves():
    p = profile()
    # 0.5 * 100 GiB - 10 used - 2 activations - 1 graphs = 37 GiB = 37 * 1024 blocks, over 2 VEs, less scratch
    assert blocks_per_ve([p], 0.5, 2) == 37 * 1024 // 2 - 1
    assert within_fraction([p], 0.5, blocks_per_ve([p], 0.5, 2), 2)
    assert not within_fraction([p], 0.5, blocks_per_ve([p], 0.5, 2) + 1, 2)


def test_larger_fraction_gives_more_blocks():
    assert blocks_per_ve([profile()], 0.9, 1) > blocks_per_ve([profile()], 0.5, 1)


def test_minimum_over_stages_on_different_devices():
    """Every rank holds the same count: the rank whose device leaves the fewest blocks decides."""
    roomy = profile("gpu0", per_block=1 << 20)
    heavy = profile("gpu1", per_block=2 << 20, used=30 * GIB)  # more layers on it, and more weights
    both = blocks_per_ve([roomy, heavy], 0.9, 1)
    assert both == blocks_per_ve([heavy], 0.9, 1) < blocks_per_ve([roomy], 0.9, 1)


def test_ranks_sharing_a_device_stay_within_its_fraction_together():
    """Two stages on one GPU: the device's KV bytes are split in proportion to each stage's bytes per block
    (so both hold the same count), after both stages' activations and graphs; the sum stays within the
    fraction, and one more block would not."""
    a = profile("gpu0", used=12 * GIB, per_block=3 << 20)
    b = profile("gpu0", used=12 * GIB, activation=4 * GIB, per_block=1 << 20)
    shared = blocks_per_ve([a, b], 0.8, 2)
    assert within_fraction([a, b], 0.8, shared, 2)
    assert not within_fraction([a, b], 0.8, shared + 1, 2)
    alone = blocks_per_ve([a], 0.8, 2)
    assert shared < alone  # the other stage's share and activations are no longer available to it


def test_device_used_by_others_counts_against_the_fraction():
    assert blocks_per_ve([profile(used=40 * GIB)], 0.5, 1) < blocks_per_ve([profile(used=10 * GIB)], 0.5, 1)


def test_no_room_names_the_setting():
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.1 .* no room"):
        blocks_per_ve([profile(used=9 * GIB, activation=2 * GIB)], 0.1, 1)
    with pytest.raises(ValueError, match="no memory profile"):
        blocks_per_ve([], 0.9, 1)


# ---- the overrides and the CPU defaults -----------------------------------------------------------------

def test_cpu_keeps_its_two_gib_budget(tiny_model):
    config = EngineArgs(tiny_model, dtype="float32", device="cpu", max_model_len=128).create_engine_config()
    per_block = kv_bytes_per_block(config.model, config.model.num_hidden_layers, config.cache.block_size)
    assert config.cache.kv_cache_memory_bytes == 2 * GIB
    assert config.num_blocks_per_ve == 2 * GIB // per_block


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_overrides_decide_the_count_before_any_stage_exists(tiny_model, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config only; no stage starts here
    args = dict(dtype="float32", device=device, max_model_len=128, num_virtual_engines=2)
    assert EngineArgs(tiny_model, num_kv_blocks=100, **args).create_engine_config().num_blocks_per_ve == 50
    config = EngineArgs(tiny_model, kv_cache_memory_gb=0.01, **args).create_engine_config()
    per_block = kv_bytes_per_block(config.model, config.model.num_hidden_layers, config.cache.block_size)
    assert config.num_blocks_per_ve == int(0.01 * GIB) // per_block // 2


def test_cuda_without_override_leaves_the_count_to_the_handshake(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = EngineArgs(tiny_model, dtype="float32", device="cuda", max_model_len=128,
                        gpu_memory_utilization=0.5).create_engine_config()
    assert config.num_blocks_per_ve == 0 and config.cache.kv_cache_memory_bytes is None
    assert config.cache.gpu_memory_utilization == 0.5


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_fraction_out_of_range_is_refused(tiny_model, bad):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineArgs(tiny_model, device="cpu", gpu_memory_utilization=bad).create_engine_config()


# ---- the handshake and the log line ----------------------------------------------------------------------

class RecordingExecutor(Executor):
    """Answers the handshake with fixed profiles and records what the engine asked."""

    def __init__(self, profiles: list[MemoryProfile]):
        self.profiles, self.calls = profiles, []

    def profile_memory(self) -> list[MemoryProfile]:
        self.calls.append("profile")
        return self.profiles

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        self.calls.append(("allocate", num_blocks_per_ve))

    async def execute(self, sched, generation=None):
        raise AssertionError("no step runs while sizing")

    def shutdown(self) -> None:
        pass

    def collect_stats(self):
        return []


def cuda_config(tiny_model, monkeypatch, **kwargs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return EngineArgs(tiny_model, dtype="float32", device="cuda", max_model_len=128, **kwargs).create_engine_config()


def test_handshake_profiles_decides_and_allocates(tiny_model, monkeypatch):
    config = cuda_config(tiny_model, monkeypatch, num_virtual_engines=2, gpu_memory_utilization=0.5)
    executor = RecordingExecutor([profile("gpu0"), profile("gpu1", used=20 * GIB)])
    sized = size_kv_cache(config, executor)
    expected = blocks_per_ve(executor.profiles, 0.5, 2)
    assert executor.calls == ["profile", ("allocate", expected)]
    assert sized.num_blocks_per_ve == expected and sized.tokens_per_ve == expected * config.cache.block_size


def test_handshake_refuses_a_pool_shorter_than_max_model_len(tiny_model, monkeypatch):
    config = cuda_config(tiny_model, monkeypatch, gpu_memory_utilization=0.5)
    per_block = 1 << 20  # 5 blocks of 16 tokens fit: fewer than max_model_len=128 tokens
    executor = RecordingExecutor([profile(total=100 * per_block, used=40 * per_block, activation=4 * per_block,
                                          graphs=0, per_block=per_block)])
    with pytest.raises(ValueError, match="raise gpu_memory_utilization"):
        size_kv_cache(config, executor)
    assert executor.calls == ["profile"]


def test_known_count_skips_the_handshake(tiny_model, monkeypatch):
    config = cuda_config(tiny_model, monkeypatch, num_kv_blocks=64)
    executor = RecordingExecutor([])
    assert size_kv_cache(config, executor) is config and executor.calls == []


def test_capacity_line(tiny_model):
    config = EngineArgs(tiny_model, dtype="float32", device="cpu", max_model_len=100, num_kv_blocks=2 * 7720,
                        block_size=16, num_virtual_engines=2).create_engine_config()
    assert kv_capacity_line(config) == ("KV cache: 123,520 tokens per virtual engine (2 VEs, 247,040 in all): "
                                        "1,235 requests of 100 tokens each per virtual engine, 2,470 in all")


# ---- the dummy steps, and the CPU engine ------------------------------------------------------------------

@pytest.mark.parametrize("tokens, seqs, max_len", [(8192, 256, 4096), (512, 64, 256), (40, 64, 256), (900, 2, 300)])
def test_dummy_prefill_is_the_largest_step_the_scheduler_could_plan(tokens, seqs, max_len):
    sched, blocks = dummy_prefill(tokens, seqs, max_len, 16, 1000)
    lengths = [r.num_tokens for r in sched.requests]
    assert sum(lengths) == min(tokens, seqs * max_len) and len(lengths) == min(seqs, sum(lengths))
    assert max(lengths) <= max_len and max(lengths) - min(lengths) <= 1
    tables = [b for r in sched.requests for b in r.block_table]
    assert sorted(tables) == list(range(blocks))  # every request its own blocks
    assert all(r.sampling_params is not None and r.start_pos == 0 for r in sched.requests)


def test_dummy_steps_run_on_a_stage_without_leaving_state(tiny_model):
    """Both dummy steps are steps a stage can run (on CPU here; the profile itself measures on CUDA), on a
    temporary cache: the stage still has no KV pool and no step record, and allocates its pool afterwards."""
    cfg = load_model_config(tiny_model, "float32")
    for stage in (StageInfo(0, 2, 0, 1), StageInfo(1, 2, 1, cfg.num_hidden_layers)):
        runner = ModelRunner(cfg, stage, num_blocks_per_ve=0, block_size=4, num_virtual_engines=1,
                             max_model_len=64, seed=0, max_num_seqs=8)
        assert runner.kv_caches == []
        prefill, blocks = dummy_prefill(100, 8, 64, 4, cfg.vocab_size)
        kv = allocate_kv_caches(cfg, stage.end_layer - stage.start_layer, blocks, 4)
        run_dummy_step(runner, prefill, kv)
        run_dummy_step(runner, dummy_decode(8, 64, 4, blocks), kv)
        assert runner.kv_caches == [] and runner.last_record is None
        runner.allocate_kv(10)
        assert len(runner.kv_caches) == 1 and runner.kv_caches[0][0].shape[2] == 11  # + the scratch block


def test_cpu_engine_never_profiles(tiny_model):
    with LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128, threads_per_worker=1,
             gpu_memory_utilization=0.3) as llm:
        stats = llm.engine.executor.collect_stats()
        per_block = kv_bytes_per_block(llm.config.model, llm.config.model.num_hidden_layers, 16)
        assert llm.config.num_blocks_per_ve == 2 * GIB // per_block  # the fraction is for CUDA only
        assert [s["memory_profile"] for s in stats] == [None]
        assert stats[0]["kv_bytes"] == (llm.config.num_blocks_per_ve + 1) * per_block
