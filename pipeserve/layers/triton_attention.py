"""Triton kernels for paged attention that read the KV cache in place (used on CUDA).

The cache of a layer is (2, num_kv_heads, num_blocks, block_size, head_dim); the kernels take its strides,
so another layout needs no copy. A token at position p of a request lives in block
`block_table[p // block_size]` at offset `p % block_size`.

* `store_kv`: one program per new token writes its K and V rows to `slot_mapping[t]`; slot -1 (a padding
  row of a static batch) writes nothing.
* `paged_decode`: one program per (request, KV head, split) walks the request's block table, with the KV
  head's whole query group as the rows of one dot (no GQA expansion), online softmax in float32. Long
  contexts are cut into up to `num_splits` segments whose partial (max, sum, output) a second kernel
  merges; with one split the first kernel writes the output directly. Every shape is fixed by the batch
  size, the table width and `num_splits`, and per-step values arrive through tensors, so a CUDA graph can
  capture it. A request with context length 0 (a padding row) gets zeros.
* `paged_prefill`: every prefill chunk of a step in one launch (packed queries, cu_seqlens style), causal
  and offset by each chunk's start position, reading the context (earlier chunks and its own keys, stored
  first) from the cache.

Loops over a context are `while` loops: Triton's interpreter (the CPU tests) cannot take a `for` loop whose
bound is loaded from memory under numpy >= 2.4.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DECODE_TILE = 64  # keys per loop iteration of the decode kernel
PREFILL_TILE_M, PREFILL_TILE_N = 64, 64  # queries per program, keys per iteration
MAX_SPLITS = 16


def _pow2(n: int, floor: int = 16) -> int:
    """tl.arange needs powers of two; tl.dot needs at least 16 along every dimension."""
    return max(floor, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str | None:
    # float32 models must not silently drop to tf32 (greedy parity with HF); other dtypes use the default.
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh, stride_kv,
                     stride_ch, stride_cb, stride_cs, NUM_KV: tl.constexpr, HD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     NKV_PAD: tl.constexpr, HD_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, NKV_PAD)[:, None]
        d = tl.arange(0, HD_PAD)[None, :]
        mask = (h < NUM_KV) & (d < HD)
        dst = h.to(tl.int64) * stride_ch + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(cache_ptr + dst, k, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(cache_ptr + stride_kv + dst, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v (T, nkv, hd) into kv_cache (2, nkv, NB, bs, hd) at slot_mapping (T,); slots < 0 are skipped."""
    t, nkv, hd = k.shape
    if t == 0:
        return
    _, _, _, bs, _ = kv_cache.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("k, v and the KV cache must be contiguous along head_dim")
    _store_kv_kernel[(t,)](k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
                           NUM_KV=nkv, HD=hd, BLOCK_SIZE=bs, NKV_PAD=triton.next_power_of_2(nkv),
                           HD_PAD=triton.next_power_of_2(hd))


@triton.jit
def _attend_tile(q, k_base, v_offset, kv_rows, kv_mask, visible, scale, m, l_sum, acc, PREC: tl.constexpr):
    """One tile of keys and values into an online softmax: q (R, HD), keys at k_base + kv_rows (N, HD), values
    v_offset further; `visible` (R, N) or (1, N) masks scores. Returns the running (max, sum, acc)."""
    k = tl.load(k_base + kv_rows, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (R, N) float32
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    v = tl.load(k_base + v_offset + kv_rows, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_sum, acc


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, mid_o_ptr, mid_ml_ptr, scale,
                   stride_qb, stride_qh, stride_kv, stride_ch, stride_cb, stride_cs, stride_tb,
                   GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   TILE: tl.constexpr, G_PAD: tl.constexpr, HD_PAD: tl.constexpr, PREC: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    ctx = tl.load(lens_ptr + b)
    num_tiles = tl.cdiv(ctx, TILE)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile = split * per_split
    end_tile = tl.minimum(tile + per_split, num_tiles)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HD_PAD)
    offs = tl.arange(0, TILE)
    heads = kvh * GROUP + g  # (G,) the query heads reading this KV head
    d_mask = d < HD
    q_mask = (g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HD_PAD], tl.float32)
    k_base = cache_ptr + kvh.to(tl.int64) * stride_ch  # int64: a layer's cache may pass 2**31 elements
    while tile < end_tile:
        pos = tile * TILE + offs  # (TILE,)
        valid = pos < ctx
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = (block * stride_cb + (pos % BLOCK_SIZE) * stride_cs)[:, None] + d[None, :]  # (TILE, HD)
        kv_mask = valid[:, None] & d_mask[None, :]
        m, l_sum, acc = _attend_tile(q, k_base, stride_kv, rows, kv_mask, valid[None, :], scale, m, l_sum, acc,
                                     PREC)  # (G, TILE) scores
        tile += 1
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # context 0: acc is 0, so is the output
        tl.store(out_ptr + (b * num_heads + heads[:, None]) * HD + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=q_mask)
    else:
        row = (b * num_heads + heads) * NUM_SPLITS + split  # (G,) into (B, nh, S)
        tl.store(mid_o_ptr + row[:, None] * HD + d[None, :], acc, mask=q_mask)
        tl.store(mid_ml_ptr + row * 2, m, mask=g < GROUP)
        tl.store(mid_ml_ptr + row * 2 + 1, l_sum, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(mid_o_ptr, mid_ml_ptr, out_ptr, HD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         HD_PAD: tl.constexpr):
    row = tl.program_id(0)  # one (request, query head)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HD_PAD)
    m = tl.load(mid_ml_ptr + (row * NUM_SPLITS + s) * 2)  # (S,) -inf where a split had no keys
    l_sum = tl.load(mid_ml_ptr + (row * NUM_SPLITS + s) * 2 + 1)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # context 0: every weight becomes exp(-inf) = 0
    w = tl.exp(m - top)  # (S,)
    total = tl.sum(l_sum * w, 0)
    acc = tl.load(mid_o_ptr + (row * NUM_SPLITS + s)[:, None] * HD + d[None, :], mask=(d < HD)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HD + d, out.to(out_ptr.dtype.element_ty), mask=d < HD)


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    return out


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per request: enough programs to fill the device, never a split shorter than one tile.

    Depends only on static shapes (batch size, block-table width), so a captured graph keeps its choice."""
    sms = _multiprocessors(device.index or 0) if device.type == "cuda" else 1
    wanted = triton.cdiv(2 * sms, batch * num_kv_heads)
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(wanted), triton.cdiv(max_context, DECODE_TILE)))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, num_splits: int | None = None, tile: int = DECODE_TILE,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, nh, hd) against each request's paged context; returns (B, nh, hd) in q's dtype (into `out`,
    contiguous, when given).

    block_tables (B, max_blocks) and context_lens (B,) are int32; padding rows have context 0."""
    b, nh, hd = q.shape
    _, nkv, _, bs, _ = kv_cache.shape
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and the KV cache must be contiguous along head_dim")
    if num_splits is None:
        num_splits = decode_splits(b, nkv, block_tables.shape[1] * bs, q.device)
    group = nh // nkv
    out = _output(q, out)
    if b == 0:
        return out
    splits = triton.next_power_of_2(num_splits)
    mid_o = torch.empty(b, nh, splits, hd, dtype=torch.float32, device=q.device) if splits > 1 else out
    mid_ml = torch.empty(b, nh, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    _decode_kernel[(b, nkv, splits)](
        q, kv_cache, block_tables, context_lens, out, mid_o, mid_ml, scale, q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        GROUP=group, HD=hd, BLOCK_SIZE=bs, NUM_SPLITS=splits, TILE=tile, G_PAD=_pow2(group),
        HD_PAD=_pow2(hd), PREC=_precision(q.dtype))
    if splits > 1:
        _merge_splits_kernel[(b * nh,)](mid_o, mid_ml, out, HD=hd, NUM_SPLITS=splits, HD_PAD=_pow2(hd))
    return out


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, tables_ptr, cu_q_ptr, start_ptr, out_ptr, scale, stride_qt, stride_qh,
                    stride_kv, stride_ch, stride_cb, stride_cs, stride_tb, GROUP: tl.constexpr, HD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, HD_PAD: tl.constexpr,
                    PREC: tl.constexpr):
    c, mt, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_heads = tl.num_programs(2)
    q_start = tl.load(cu_q_ptr + c)
    q_len = tl.load(cu_q_ptr + c + 1) - q_start
    if mt * TILE_M < q_len:
        start = tl.load(start_ptr + c)
        rows = mt * TILE_M + tl.arange(0, TILE_M)  # (M,) query index within the chunk
        d = tl.arange(0, HD_PAD)
        offs = tl.arange(0, TILE_N)
        d_mask = d < HD
        q_mask = (rows < q_len)[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_mask,
                    other=0.0)
        q_pos = start + rows  # (M,) absolute positions
        kv_end = start + tl.minimum((mt + 1) * TILE_M, q_len)  # keys up to the tile's last query
        m = tl.full([TILE_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([TILE_M], tl.float32)
        acc = tl.zeros([TILE_M, HD_PAD], tl.float32)
        k_base = cache_ptr + (h // GROUP).to(tl.int64) * stride_ch
        n = kv_end * 0  # an int32 tensor like kv_end: the loop-carried type stays fixed
        while n < kv_end:
            pos = n + offs  # (N,)
            valid = pos < kv_end
            block = tl.load(tables_ptr + c * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            kv_rows = (block * stride_cb + (pos % BLOCK_SIZE) * stride_cs)[:, None] + d[None, :]
            kv_mask = valid[:, None] & d_mask[None, :]
            visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])  # (M, N): causal, offset by the start
            # The running max stays finite: position 0 is visible to every row.
            m, l_sum, acc = _attend_tile(q, k_base, stride_kv, kv_rows, kv_mask, visible, scale, m, l_sum, acc, PREC)
            n += TILE_N
        out = acc / l_sum[:, None]
        dst = out_ptr + ((q_start + rows)[:, None] * num_heads + h) * HD + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                  start_pos: torch.Tensor, max_query_len: int, scale: float, tile_m: int = PREFILL_TILE_M,
                  tile_n: int = PREFILL_TILE_N, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed chunks q (N, nh, hd) over their paged contexts, K/V already stored.

    Chunk c is rows cu_query_lens[c]:cu_query_lens[c+1] at positions start_pos[c]..; block_tables (C, mb),
    cu_query_lens (C+1,) and start_pos (C,) are int32. Returns (N, nh, hd) in q's dtype (into `out`, contiguous,
    when given)."""
    n, nh, hd = q.shape
    _, nkv, _, bs, _ = kv_cache.shape
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and the KV cache must be contiguous along head_dim")
    out = _output(q, out)
    chunks = start_pos.shape[0]
    if n == 0 or chunks == 0:
        return out
    grid = (chunks, triton.cdiv(max_query_len, tile_m), nh)
    _prefill_kernel[grid](q, kv_cache, block_tables, cu_query_lens, start_pos, out, scale, q.stride(0), q.stride(1),
                          kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
                          block_tables.stride(0), GROUP=nh // nkv, HD=hd, BLOCK_SIZE=bs, TILE_M=tile_m,
                          TILE_N=tile_n, HD_PAD=_pow2(hd), PREC=_precision(q.dtype))
    return out
