"""Flattens a SchedulerOutput into model inputs: token ids, positions, KV slots, attention metadata.

Decodes come first (batched into one attention call), prefill chunks after. Every stage builds the same
order from the same SchedulerOutput, so the rows of the tensors handed between stages line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeserve.layers.attention import AttentionMetadata, PrefillChunk, pack_prefills
from pipeserve.layers.kernel_select import device_uses_kernels
from pipeserve.types import ScheduledRequest, SchedulerOutput


@dataclass
class ModelInput:
    """Everything a stage needs for one forward pass."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows whose last hidden state is sampled
    sampled_requests: list[ScheduledRequest]  # same order as sample_rows
    # Chunks that score prompt tokens (prompt logprobs): the entry and the row of its first token.
    prompt_scored: list[tuple[ScheduledRequest, int]]


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _split(sched: SchedulerOutput) -> tuple[list[ScheduledRequest], list[ScheduledRequest]]:
    """Decodes and prefill chunks, each in plan order: the step's rows are decodes first."""
    return [r for r in sched.requests if r.is_decode], [r for r in sched.requests if not r.is_decode]


def ordered_requests(sched: SchedulerOutput) -> list[ScheduledRequest]:
    """The order of the step's rows."""
    decodes, prefills = _split(sched)
    return decodes + prefills


def rows_for(sched: SchedulerOutput, subset: SchedulerOutput) -> torch.Tensor | None:
    """Rows of `sched`'s tensors that belong to `subset`'s requests (in `subset`'s row order, since
    filtering keeps the decode/prefill order); None when that is every row."""
    if len(subset.requests) == len(sched.requests):
        return None
    keep = {r.req_id for r in subset.requests}
    rows, row = [], 0
    for r in ordered_requests(sched):
        if r.req_id in keep:
            rows.extend(range(row, row + r.num_tokens))
        row += r.num_tokens
    return torch.tensor(rows, dtype=torch.long)


def build_model_input(sched: SchedulerOutput, block_size: int, device: str = "cpu") -> ModelInput:
    """Order the step's requests (decodes, then prefills) and derive every index tensor once per step."""
    decodes, prefills = _split(sched)
    ordered = decodes + prefills
    ids, positions, slots, sample_rows, sampled, scored = [], [], [], [], [], []
    row = 0
    for r in ordered:
        if r.prompt_logprobs is not None:
            scored.append((r, row))
        ids += r.token_ids
        positions += range(r.start_pos, r.context_len)
        slots += _slots(r.block_table, r.start_pos, r.context_len, block_size)
        row += r.num_tokens
        if r.sampling_params is not None:
            sample_rows.append(row - 1)
            sampled.append(r)
    attn = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                             num_decodes=len(decodes))
    if decodes:
        attn.block_tables, attn.context_lens = _decode_tables(decodes, block_size, device)
    row = len(decodes)
    if prefills and device_uses_kernels(device):  # one kernel over every chunk: no per-chunk slots or masks
        attn.packed_prefill = pack_prefills([(r.block_table, r.start_pos, r.num_tokens) for r in prefills],
                                            block_size, device)
        prefills = []
    for r in prefills:
        attn.prefills.append(_prefill_chunk(r, row, block_size, device))
        row += r.num_tokens
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attn=attn,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        sampled_requests=sampled,
        prompt_scored=scored,
    )


def _decode_tables(decodes: list[ScheduledRequest], block_size: int, device: str) -> tuple[torch.Tensor, ...]:
    max_blocks = max(-(-r.context_len // block_size) for r in decodes)
    tables = torch.zeros(len(decodes), max_blocks, dtype=torch.int32)
    for i, r in enumerate(decodes):
        used = r.block_table[: -(-r.context_len // block_size)]
        tables[i, : len(used)] = torch.tensor(used, dtype=torch.int32)
    lengths = torch.tensor([r.context_len for r in decodes], dtype=torch.int32)
    return tables.to(device), lengths.to(device)  # (B, nb), (B,)


def _prefill_chunk(r: ScheduledRequest, query_start: int, block_size: int, device: str) -> PrefillChunk:
    if r.start_pos == 0:  # the chunk is the whole context so far: plain causal attention on fresh K/V
        return PrefillChunk(query_start, r.num_tokens, 0, None, None)
    ctx = torch.tensor(_slots(r.block_table, 0, r.context_len, block_size), dtype=torch.long)
    q_pos = torch.arange(r.start_pos, r.context_len)[:, None]  # (n, 1)
    mask = torch.arange(r.context_len)[None, :] <= q_pos  # (n, ctx): causal, offset by start_pos
    return PrefillChunk(query_start, r.num_tokens, r.start_pos, ctx.to(device), mask.to(device))
