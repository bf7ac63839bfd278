"""Builds one step's model inputs from a resolved plan: token ids, positions, KV slots, attention metadata.

Decodes come first (batched into one attention call), prefill chunks after. Every stage builds the same
order from the same SchedulerOutput, so the rows of the tensors handed between stages line up.

Two builders:
* `DecodeInputs`, for steps where every request decodes (the common step, and the one CUDA graphs replay):
  persistent host buffers (pinned on a GPU) and their device twins, filled from the stage's persistent
  rows (input_batch.py) with a few numpy operations; only the first rows are copied, without waiting.
* `build_model_input`, for any step (prefill chunks, mixed steps): one tensor per input per step, copied to a
  GPU through the stage's pinned staging buffers (host_staging.py) when it passes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeserve.layers.attention import (
    AttentionMetadata,
    PackedPrefill,
    PrefillChunk,
    pack_prefills,
    packed_prefill_arrays,
)
from pipeserve.layers.kernel_select import device_uses_kernels
from pipeserve.types import PLACEHOLDER, ScheduledRequest, SchedulerOutput
from pipeserve.worker.host_staging import HostStaging
from pipeserve.worker.input_batch import InputBatch


@dataclass
class ModelInput:
    """Everything a stage needs for one forward pass."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    attn: AttentionMetadata
    sample_rows: torch.Tensor | None  # (S,) rows whose last hidden state is sampled; None: every row, in order
    sampled_requests: list[ScheduledRequest]  # same order as sample_rows
    # Chunks that score prompt tokens (prompt logprobs): the entry and the row of its first token.
    prompt_scored: list[tuple[ScheduledRequest, int]]
    # A persistent-buffer decode step: (S,) each row's persistent row (input_batch.py), on the device.
    persistent_rows: torch.Tensor | None = None


def is_pure_decode(reqs: list[ScheduledRequest]) -> bool:
    """Every entry computes one token and samples the next (a one-token prompt chunk does not qualify)."""
    return bool(reqs) and all(r.is_decode and r.sampling_params is not None and r.prompt_logprobs is None
                              for r in reqs)


class DecodeInputs:
    """Inputs of decode steps of up to `max_batch` requests, in buffers that live as long as the stage.

    The device buffers double as a CUDA graph's static inputs. Rows past the step's requests (padding up to a
    captured batch size) point at the scratch block: they write their K/V there and attend to that one slot,
    so their (discarded) outputs are finite and no real request's cache is touched.
    """

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, scratch_block: int, device: str):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.scratch_block = scratch_block
        pinned = device != "cpu"
        # ids, positions, slots, and each row's persistent row (input_batch.py): where async scheduling finds the
        # id a placeholder stands for (sampled_ids.py)
        self._host_long = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pinned)
        # context lengths (max_batch,), then the block tables, flat: any (n, width) prefix view is contiguous.
        self._host_int = torch.zeros(max_batch * (1 + max_blocks), dtype=torch.int32, pin_memory=pinned)
        self._long, self._int = self._host_long.numpy(), self._host_int.numpy()
        self._fill_padding(0, max_batch, max_blocks)
        self.has_placeholders = False  # some input id of the last filled step is a placeholder
        if pinned:
            self.dev_long, self.dev_int = self._host_long.to(device), self._host_int.to(device)
            self._copied = torch.cuda.Event()
        else:  # the host buffers are the device's
            self.dev_long, self.dev_int, self._copied = self._host_long, self._host_int, None

    def fill(self, batch: InputBatch, reqs: list[ScheduledRequest], padded: int, width: int) -> None:
        """Write the decodes `reqs` into the first rows (padding rows up to `padded`), block tables `width` wide."""
        n, bs = len(reqs), self.block_size
        if n > padded or padded > self.max_batch or width > self.max_blocks:
            raise ValueError(f"a decode batch of {n} padded to {padded} x {width} blocks exceeds the buffers "
                             f"({self.max_batch} x {self.max_blocks})")
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()  # the last step's copy still reads the host buffers
        rows = batch.rows([r.req_id for r in reqs])  # (n,)
        ids, pos, slots = self._long[0], self._long[1], self._long[2]
        ids[:n] = [r.token_ids[0] for r in reqs]
        self._long[3, :n] = rows
        self.has_placeholders = bool((ids[:n] == PLACEHOLDER).any())
        pos[:n] = [r.start_pos for r in reqs]
        p = pos[:n]
        tables = batch.block_tables  # (rows, cols)
        slots[:n] = tables[rows, p // bs] * bs + p % bs
        self._int[:n] = p + 1  # context lengths
        cols = min(width, tables.shape[1])
        block_view = self._int[self.max_batch: self.max_batch + padded * width].reshape(padded, width)
        block_view[:n, :cols] = tables[rows, :cols]  # entries past a context are never attended to
        self._fill_padding(n, padded, width)
        if self._copied is not None:
            self.dev_long[:, :padded].copy_(self._host_long[:, :padded], non_blocking=True)
            self.dev_int[:padded].copy_(self._host_int[:padded], non_blocking=True)
            flat = slice(self.max_batch, self.max_batch + padded * width)
            self.dev_int[flat].copy_(self._host_int[flat], non_blocking=True)
            self._copied.record()

    def _fill_padding(self, start: int, end: int, width: int) -> None:
        if start >= end:
            return
        self._long[0, start:end] = 0
        self._long[1, start:end] = 0
        self._long[2, start:end] = self.scratch_block * self.block_size
        self._long[3, start:end] = 0
        self._int[start:end] = 1
        self._int[self.max_batch + start * width: self.max_batch + end * width] = self.scratch_block

    def views(self, padded: int, width: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, attention metadata) of the first `padded` rows, on the device."""
        tables = self.dev_int[self.max_batch: self.max_batch + padded * width].view(padded, width)
        meta = AttentionMetadata(slot_mapping=self.dev_long[2, :padded], num_decodes=padded,
                                 block_tables=tables, context_lens=self.dev_int[:padded])
        return self.dev_long[0, :padded], self.dev_long[1, :padded], meta

    def persistent_rows(self, n: int) -> torch.Tensor:
        """(n,) the persistent row of each of the last filled step's requests, on the device."""
        return self.dev_long[3, :n]

    def model_input(self, batch: InputBatch, reqs: list[ScheduledRequest]) -> ModelInput:
        """An unpadded decode step, its tables as wide as its longest context needs."""
        n, bs = len(reqs), self.block_size
        width = -(-(max(r.start_pos for r in reqs) + 1) // bs)
        self.fill(batch, reqs, n, width)
        ids, positions, meta = self.views(n, width)
        return ModelInput(ids, positions, meta, None, reqs, [], self.persistent_rows(n))


# ---- any step -----------------------------------------------------------------------------------------


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


def build_model_input(sched: SchedulerOutput, block_size: int, device: str = "cpu",
                      staging: HostStaging | None = None) -> ModelInput:
    """Order the step's requests (decodes, then prefills) and derive every index tensor once per step.
    `staging`: the stage's pinned buffers, through which the index tensors reach the device without waiting."""
    if staging is not None:
        return _staged_model_input(sched, block_size, staging)
    decodes, prefills = _split(sched)
    ids, positions, slots, sample_rows, sampled, scored = _rows(decodes + prefills, block_size)
    attn = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                             num_decodes=len(decodes))
    if decodes:
        attn.block_tables, attn.context_lens = (torch.from_numpy(a).to(device)
                                                for a in _decode_tables(decodes, block_size))
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


def _rows(ordered: list[ScheduledRequest], block_size: int) -> tuple[list, ...]:
    """Per row: (input ids, positions, KV slots); the rows sampled and their entries; the entries scoring their
    prompt, with their first row."""
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
    return ids, positions, slots, sample_rows, sampled, scored


def _staged_model_input(sched: SchedulerOutput, block_size: int, staging: HostStaging) -> ModelInput:
    """`build_model_input` with every index tensor in one staged copy per dtype (the same values)."""
    decodes, prefills = _split(sched)
    ids, positions, slots, sample_rows, sampled, scored = _rows(decodes + prefills, block_size)
    host = [torch.tensor(v, dtype=torch.long) for v in (ids, positions, slots, sample_rows)]
    if decodes:
        host += [torch.from_numpy(a) for a in _decode_tables(decodes, block_size)]
    packed = prefills and device_uses_kernels(staging.device)
    if packed:
        host += packed_prefill_arrays([(r.block_table, r.start_pos, r.num_tokens) for r in prefills], block_size)
    dev = staging.to_device(host)
    attn = AttentionMetadata(slot_mapping=dev[2], num_decodes=len(decodes))
    if decodes:
        attn.block_tables, attn.context_lens = dev[4], dev[5]
    if packed:
        attn.packed_prefill = PackedPrefill(*dev[-3:], max(r.num_tokens for r in prefills))
    else:  # chunks with masks (no kernels on this device)
        row = len(decodes)
        for r in prefills:
            attn.prefills.append(_prefill_chunk(r, row, block_size, staging.device))
            row += r.num_tokens
    return ModelInput(input_ids=dev[0], positions=dev[1], attn=attn, sample_rows=dev[3], sampled_requests=sampled,
                      prompt_scored=scored)


def _decode_tables(decodes: list[ScheduledRequest], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(block tables (B, max_blocks), context lengths (B,)) of the decodes, int32."""
    lengths = np.fromiter((r.context_len for r in decodes), dtype=np.int32, count=len(decodes))  # (B,)
    used = -(-lengths // block_size)  # (B,) blocks each context covers
    tables = np.zeros((len(decodes), int(used.max())), dtype=np.int32)  # (B, max_blocks), padded with block 0
    for i, r in enumerate(decodes):
        tables[i, : used[i]] = r.block_table[: used[i]]
    return tables, lengths


def _prefill_chunk(r: ScheduledRequest, query_start: int, block_size: int, device: str) -> PrefillChunk:
    if r.start_pos == 0:  # the chunk is the whole context so far: plain causal attention on fresh K/V
        return PrefillChunk(query_start, r.num_tokens, 0, None, None)
    ctx = torch.tensor(_slots(r.block_table, 0, r.context_len, block_size), dtype=torch.long)
    q_pos = torch.arange(r.start_pos, r.context_len)[:, None]  # (n, 1)
    mask = torch.arange(r.context_len)[None, :] <= q_pos  # (n, ctx): causal, offset by start_pos
    return PrefillChunk(query_start, r.num_tokens, r.start_pos, ctx.to(device), mask.to(device))
