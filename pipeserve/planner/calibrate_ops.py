"""`--calibrate`'s per-layer costs: real decoder layers of the model (pipeserve's own LlamaDecoderLayer and
paged attention, random weights) at one TP rank's shape, timed alone in this process at the row counts and
context lengths a step runs, plus the LM head and greedy sampler. A micro-benchmark of the model's code, never
of the runs a plan predicts: no engine, no scheduler, no other process.

A stage runs its layers one after another, each reading its own weights and KV blocks, so at a decode step
every layer's weights come from memory, not from the cache: one layer called again and again would keep its
weights (14 MB for the embedded model) in a 32 MiB last-level cache and time a third faster than a stage
runs it. The timed call therefore runs several distinct layers in turn, as many as make their weights four
times the last-level cache (no more than the model has), each with its own KV pool, and a layer's cost is
the call's time over their count. Each figure is the median call: a shared machine's noise falls on both
sides of it, where the least call is the rare one nothing disturbed, faster than a run of thousands of steps.

What it stores, per rank shape (docs/planning.md, "Calibrated CPU steps"):
* `base`: [rows, seconds] of one layer: decode rows up to 64 with the attention to their context taken out
  (the slope below), then prompt chunks from position 0 (their causal attention to themselves included);
* `attn_s_per_row_ctx`: seconds per (decode row x context token), the slope between two context lengths;
* `prefill_s_per_row_ctx`: seconds per (chunk row x earlier context token), a chunk of the largest size that
  starts at 0 against the same chunk after as many earlier tokens (a prompt's later chunks);
* `head`: [rows, seconds] of the final norm, LM head GEMM and greedy argmax on the rank's vocabulary shard.
"""

from __future__ import annotations

import contextlib
import glob
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from pipeserve.config import ModelConfig
from pipeserve.layers.attention import AttentionMetadata, PrefillChunk
from pipeserve.layers.linear import NO_TP
from pipeserve.layers.norm import RMSNorm
from pipeserve.layers.rotary import RotaryEmbedding
from pipeserve.models.llama import LlamaDecoderLayer
from pipeserve.models.rank_shapes import head_ranges
from pipeserve.planner.cpu_steps import shape_key
from pipeserve.planner.memory import layer_params

BLOCK = 16
DECODE_ROWS = (1, 4, 16, 64)  # a decode step's rows: one per sequence of a virtual engine's batch
PREFILL_ROWS = (128, 512)  # prefill chunks (512: serve's CPU token budget)
SHORT_CTX, LONG_CTX = 32, 1024  # the two context lengths the attention slope is taken between


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads, as a stage process runs (--threads-per-worker), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rank_config(model: ModelConfig, tp: int) -> ModelConfig:
    """The model as TP rank 0 holds it (its query and KV heads, its share of the MLP), run without TP."""
    (_, q_heads), (_, kv_heads) = head_ranges(model, 0, tp)
    return replace(model, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                   intermediate_size=model.intermediate_size // tp, vocab_size=-(-model.vocab_size // tp),
                   quantization="none")


def rank_shape_key(model: ModelConfig, tp: int) -> str:
    c = rank_config(model, tp)
    return shape_key(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                     c.vocab_size, c.dtype)


MIN_CALLS = 7  # one call varies by 10-15% on a shared VM: the median of 7 does not follow one slow call


def _median_of(fn, seconds: float) -> float:
    """Median seconds of one call over about `seconds` of calls (at least MIN_CALLS), after one warm-up call."""
    fn()
    times, spent = [], 0.0
    while spent < seconds or len(times) < MIN_CALLS:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return sorted(times)[len(times) // 2]


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), else 32 MiB."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


def streamed_layer_count(cfg: ModelConfig) -> int:
    """Distinct layers a timed call runs in turn: their weights four times the last-level cache, at most the
    model's layers (a stage never holds more)."""
    layer_bytes = layer_params(cfg, cfg.num_attention_heads, cfg.num_key_value_heads, 1) * cfg.dtype_bytes
    return max(1, min(cfg.num_hidden_layers, -(-4 * last_level_cache_bytes() // layer_bytes)))


class StreamedLayers:
    """`count` decoder layers of one rank shape with random weights, the rotary tables they share, and a KV
    pool per layer, grown to the largest measurement's blocks and reused by the others (zeroing a fresh
    gigabyte of pools per measurement would cost the calibration more than the measurements)."""

    def __init__(self, cfg: ModelConfig, count: int):
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, 4 * LONG_CTX, cfg.rope_theta, cfg.rope_scaling)
        self.layers = [LlamaDecoderLayer(cfg, self.rope, NO_TP) for _ in range(count)]
        self._pools: list[torch.Tensor] = []
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (p for layer in self.layers for p in layer.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape))

    def kv_pools(self, num_blocks: int) -> list[torch.Tensor]:
        """One pool of at least `num_blocks` blocks per layer, each [2, kv heads, blocks, block size, head dim]."""
        if not self._pools or self._pools[0].shape[2] < num_blocks:
            c = self.cfg
            self._pools = []  # the old pools go before the new ones are made
            self._pools = [torch.zeros(2, c.num_key_value_heads, num_blocks, BLOCK, c.head_dim, dtype=c.torch_dtype)
                           for _ in self.layers]
        return self._pools


def _decode_meta(rows: int, ctx: int, num_blocks: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """`rows` decodes, each attending to `ctx` tokens in blocks of its own; (metadata, positions)."""
    per_row = -(-ctx // BLOCK)
    tables = torch.arange(rows * per_row, dtype=torch.int32).view(rows, per_row) % num_blocks
    slots = tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=rows, block_tables=tables,
                             context_lens=torch.full((rows,), ctx, dtype=torch.int32))
    return meta, torch.full((rows,), ctx - 1, dtype=torch.long)


def _prefill_meta(rows: int, start: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """One prompt chunk of `rows` tokens at positions start.., the earlier ones already in the cache."""
    positions = torch.arange(start, start + rows)
    if start == 0:
        chunk = PrefillChunk(0, rows, 0, None, None)
    else:  # as the engine builds a later chunk: its whole context's slots, and which of them each row may see
        mask = torch.arange(start + rows)[None, :] <= positions[:, None]  # (rows, start + rows)
        chunk = PrefillChunk(0, rows, start, torch.arange(start + rows), mask)
    return AttentionMetadata(slot_mapping=positions, prefills=[chunk]), positions


def layer_seconds(cfg: ModelConfig, rows: int, ctx: int, prefill: bool, seconds: float,
                  stack: StreamedLayers) -> float:
    """Seconds of one decoder layer's forward as a stage runs it among others (module doc): `rows` decodes at
    context `ctx`, or a `rows`-token prompt chunk after `ctx - rows` earlier tokens."""
    num_blocks = rows * -(-ctx // BLOCK) + 1
    kvs = stack.kv_pools(num_blocks)
    meta, positions = _prefill_meta(rows, ctx - rows) if prefill else _decode_meta(rows, ctx, num_blocks)
    meta.rope_tables = stack.rope.tables(positions, cfg.torch_dtype)
    x = torch.randn(rows, cfg.hidden_size).to(cfg.torch_dtype)  # [rows, hidden]
    residual = torch.randn(rows, cfg.hidden_size).to(cfg.torch_dtype)

    def run_stack() -> None:
        for layer, kv in zip(stack.layers, kvs, strict=True):
            layer(x, residual, kv, meta)

    with torch.inference_mode():
        return _median_of(run_stack, seconds) / len(stack.layers)


def head_seconds(cfg: ModelConfig, rows: int, seconds: float) -> float:
    """Seconds of the last stage's tail for `rows` sampled rows: final norm, LM head, greedy argmax."""
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
    weight = (torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.02).to(cfg.torch_dtype)  # [vocab shard, hidden]
    x = torch.randn(rows, cfg.hidden_size).to(cfg.torch_dtype)

    def tail() -> torch.Tensor:
        return torch.nn.functional.linear(norm(x), weight).float().argmax(dim=-1)

    with torch.inference_mode():
        return _median_of(tail, seconds)


def measure_layer_costs(model: ModelConfig, tp: int, seconds: float = 0.4,
                        decode_rows: tuple[int, ...] = DECODE_ROWS,
                        prefill_rows: tuple[int, ...] = PREFILL_ROWS) -> dict:
    """The stored costs of one rank shape (module doc), measured with one torch thread."""
    cfg = rank_config(model, tp)
    with torch_threads(1):
        parts = StreamedLayers(cfg, streamed_layer_count(cfg))
        parts.kv_pools(max(decode_rows) * -(-LONG_CTX // BLOCK) + 1)  # the largest measurement's, made once
        short = {r: layer_seconds(cfg, r, SHORT_CTX, False, seconds, parts) for r in decode_rows}
        wide = [r for r in decode_rows if r >= 4] or list(decode_rows)
        slopes = [(layer_seconds(cfg, r, LONG_CTX, False, seconds, parts) - short[r]) / (r * (LONG_CTX - SHORT_CTX))
                  for r in wide]
        slope = max(0.0, sum(slopes) / len(slopes))
        base = [[r, short[r] - slope * r * SHORT_CTX] for r in decode_rows]
        chunks = {n: layer_seconds(cfg, n, n, True, seconds, parts) for n in prefill_rows}
        base += [[n, t] for n, t in chunks.items()]
        n = max(prefill_rows)
        later = layer_seconds(cfg, n, 2 * n, True, seconds, parts)  # the same chunk after n earlier tokens
        prefill_slope = max(0.0, (later - chunks[n]) / (n * n))
        head = [[r, head_seconds(cfg, r, seconds)] for r in sorted({1, *decode_rows})]
    base.sort()
    return {"base": base, "attn_s_per_row_ctx": slope, "prefill_s_per_row_ctx": prefill_slope, "head": head}

