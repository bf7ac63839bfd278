"""How many KV blocks each virtual engine gets, and the start-up handshake that decides it on CUDA.

With `num_kv_blocks` or `kv_cache_memory_gb` (and always on CPU) the count is arithmetic, known before any
stage exists (EngineArgs). On CUDA without them, the stages start without a KV pool; each rank runs one
profiling step at the largest batch and reports a MemoryProfile; the engine decides the count from
`gpu_memory_utilization`; every rank then allocates that many blocks and captures its graphs. Only then are
the schedulers' block managers built, with the same count.

The rule for one device, whatever number of ranks share it (PP stages or TP ranks on one GPU):

    KV bytes of the device = total * gpu_memory_utilization
                             - what is in use on it before any KV exists (every process on it)
                             - the sum over its ranks of (activation peak + CUDA graphs)

Every rank holds the same number of blocks, so the device's KV bytes are divided in proportion to each
rank's bytes per block (its layers and KV heads): blocks = KV bytes / (VEs x sum of bytes per block), less
the scratch block each VE keeps. The smallest count over all devices is every rank's. The ranks of a device
then use at most the fraction of it in all.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeserve.config import EngineConfig
from pipeserve.types import MemoryProfile

if TYPE_CHECKING:  # only sizing a live engine's cache takes one; the arithmetic serves `pipeserve plan` too
    from pipeserve.executor.base import Executor

logger = logging.getLogger(__name__)

GIB = float(1 << 30)


def blocks_per_ve(profiles: list[MemoryProfile], fraction: float, num_ve: int) -> int:
    """The block count every virtual engine of every rank can hold (see the module docstring)."""
    if not profiles:
        raise ValueError("no memory profile came back from the stages")
    by_device: dict[str, list[MemoryProfile]] = defaultdict(list)
    for p in profiles:
        by_device[p.device].append(p)
    return min(_device_blocks(device, ranks, fraction, num_ve) for device, ranks in by_device.items())


def _device_blocks(device: str, ranks: list[MemoryProfile], fraction: float, num_ve: int) -> int:
    total = max(p.total_bytes for p in ranks)
    allowed = int(total * fraction)
    used = max(p.used_bytes for p in ranks)  # each rank saw every process on the device: the same figure
    step = sum(p.activation_bytes + p.graph_bytes for p in ranks)  # the ranks' steps can run at the same time
    kv_bytes = allowed - used - step
    per_block = sum(p.kv_bytes_per_block for p in ranks)
    blocks = kv_bytes // (per_block * num_ve) - 1 if kv_bytes > 0 else 0  # - 1: each VE's scratch block
    if blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization={fraction} allows {allowed / GIB:.2f} GiB of device {device}'s "
            f"{total / GIB:.2f} GiB, but {used / GIB:.2f} GiB is in use on it (weights included) and the largest "
            f"step of its {len(ranks)} rank(s) needs {step / GIB:.2f} GiB more, leaving no room for a KV block "
            f"per virtual engine: raise gpu_memory_utilization, lower max_num_batched_tokens / max_num_seqs, or "
            f"set num_kv_blocks")
    return blocks


def check_kv_capacity(blocks: int, block_size: int, max_len: int, hint: str) -> None:
    """A virtual engine must hold at least one request of max_model_len tokens."""
    if blocks * block_size < max_len:
        raise ValueError(f"the KV cache holds {blocks * block_size} tokens per virtual engine, fewer than "
                         f"max_model_len={max_len}: {hint} or lower max_model_len")


def kv_capacity_line(config: EngineConfig) -> str:
    """The start-up log's summary: tokens and full-length requests that fit, per virtual engine and in all."""
    tokens, ves, max_len = config.tokens_per_ve, config.num_virtual_engines, config.scheduler.max_model_len
    full = tokens // max_len
    return (f"KV cache: {tokens:,} tokens per virtual engine ({ves} VE{'s' if ves > 1 else ''}, {tokens * ves:,} "
            f"in all): {full:,} requests of {max_len:,} tokens each per virtual engine, {full * ves:,} in all")


def size_kv_cache(config: EngineConfig, executor: Executor) -> EngineConfig:
    """The config with `num_blocks_per_ve` decided; when it was not known yet, run the handshake: profile every
    rank, decide, and have every rank allocate its pool. Raises ValueError when the fraction leaves no room."""
    if config.num_blocks_per_ve:
        logger.info("%s", kv_capacity_line(config))
        return config
    fraction = config.cache.gpu_memory_utilization
    profiles = executor.profile_memory()
    blocks = blocks_per_ve(profiles, fraction, config.num_virtual_engines)
    check_kv_capacity(blocks, config.cache.block_size, config.scheduler.max_model_len,
                      "raise gpu_memory_utilization (or set num_kv_blocks)")
    executor.allocate_kv(blocks)
    config = replace(config, num_blocks_per_ve=blocks)
    per_block = max(p.kv_bytes_per_block for p in profiles)
    logger.info("KV pool sized by gpu_memory_utilization=%s: %d blocks per virtual engine, %.2f GiB on the "
                "busiest rank", fraction, blocks,
                (blocks + 1) * config.num_virtual_engines * per_block / GIB)
    logger.info("%s", kv_capacity_line(config))
    return config
