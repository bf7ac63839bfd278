"""The Triton kernels against torch references: compiled on a CUDA device, else run by Triton's interpreter
on CPU tensors (tiny shapes either way; conftest.py enables the interpreter before anything imports triton).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton", reason="triton is not installed (the test extra installs it)")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("without CUDA these tests need Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1")

from pipeserve.layers import fused  # noqa: E402
from pipeserve.layers import triton_attention as ta  # noqa: E402
from pipeserve.layers.attention import AttentionMetadata, PagedAttention, PrefillChunk, pack_prefills  # noqa: E402
from pipeserve.layers.norm import RMSNorm  # noqa: E402
from pipeserve.layers.rotary import RotaryEmbedding  # noqa: E402

BS, NKV, GROUP, HD = 4, 2, 3, 8  # 4-token blocks, GQA groups of 3 (padded inside the kernels), head_dim 8
NB = 24


def _cache(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, NKV, NB, BS, HD, dtype=dtype)  # (2, nkv, NB, bs, hd)


def _tables(lengths: list[int]) -> torch.Tensor:
    """Disjoint, shuffled blocks per request; unused entries point at block 0."""
    width = max(1, max(-(-n // BS) for n in lengths))
    free = torch.randperm(NB).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for i, n in enumerate(lengths):
        for j in range(-(-n // BS)):
            tables[i, j] = free.pop()
    return tables


def _on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def _context(cache: torch.Tensor, table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nkv, n, hd) keys and values of positions 0..n-1."""
    pos = torch.arange(n)
    blocks = table.long()[pos // BS]
    return cache[0][:, blocks, pos % BS], cache[1][:, blocks, pos % BS]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (n, nh, hd) over k, v (nkv, ctx, hd) in float32; mask (n, ctx) or None (all visible)."""
    o = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float()[None], v.float()[None],
                                       attn_mask=mask, scale=HD**-0.5, enable_gqa=True)
    return o[0].transpose(0, 1)  # (n, nh, hd)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_matches_reference(splits):
    torch.manual_seed(0)
    lengths = [5, 0, 17, 1, 12]  # a padding row (context 0), one token, several blocks, several tiles
    cache, tables = _cache(), _tables(lengths)
    q = torch.randn(len(lengths), NKV * GROUP, HD)
    out = ta.paged_decode(*_on_device(q, cache, tables, torch.tensor(lengths, dtype=torch.int32)), HD**-0.5,
                          num_splits=splits, tile=16).cpu()
    assert not out.isnan().any()
    for i, n in enumerate(lengths):
        if n == 0:
            assert (out[i] == 0).all()
            continue
        k, v = _context(cache, tables[i], n)
        torch.testing.assert_close(out[i], _attend(q[i : i + 1], k, v, None)[0], rtol=1e-5, atol=1e-5)


BF16_ON_CUDA = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton 3.6's interpreter multiplies bfloat16 dot operands as raw bits"))


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_CUDA])
def test_decode_strided_query(dtype):
    torch.manual_seed(1)
    lengths = [9, 20]
    cache, tables = _cache(dtype), _tables(lengths)
    qkv = torch.randn(2, NKV * GROUP + 2 * NKV, HD, dtype=dtype)
    q = qkv[:, : NKV * GROUP]  # a view of a fused projection: rows strided
    q_dev, *rest = _on_device(qkv, cache, tables, torch.tensor(lengths, dtype=torch.int32))
    out = ta.paged_decode(q_dev[:, : NKV * GROUP], *rest, HD**-0.5, num_splits=2, tile=16).cpu()
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, n in enumerate(lengths):
        k, v = _context(cache, tables[i], n)
        torch.testing.assert_close(out[i].float(), _attend(q[i : i + 1], k, v, None)[0], rtol=tol, atol=tol)


def test_store_skips_negative_slots():
    torch.manual_seed(2)
    cache = torch.zeros(2, NKV, NB, BS, HD, device=DEVICE)
    slots = torch.tensor([5, -1, 0, 30, -1], dtype=torch.long)
    kv = torch.randn(5, 2 * NKV, HD)
    k, v = kv[:, :NKV], kv[:, NKV:]  # strided views, as the fused projection gives them
    kv_dev, slots_dev = _on_device(kv, slots)
    ta.store_kv(kv_dev[:, :NKV], kv_dev[:, NKV:], cache, slots_dev)
    expected = torch.zeros_like(cache)
    flat = expected.view(2, NKV, NB * BS, HD)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            flat[0, :, s], flat[1, :, s] = k[t], v[t]
    assert torch.equal(cache.cpu(), expected)


def test_prefill_chunks_with_offsets():
    torch.manual_seed(3)
    # (start position, new tokens): a first chunk, a later chunk crossing blocks, a one-token chunk
    chunks = [(0, 7), (9, 6), (4, 1), (0, 18)]
    lengths = [s + n for s, n in chunks]
    cache, tables = _cache(), _tables(lengths)
    cu = torch.tensor([0] + [sum(n for _, n in chunks[: i + 1]) for i in range(len(chunks))], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), NKV * GROUP, HD)
    starts = torch.tensor([s for s, _ in chunks], dtype=torch.int32)
    out = ta.paged_prefill(*_on_device(q, cache, tables, cu, starts), max(n for _, n in chunks), HD**-0.5,
                           tile_m=16, tile_n=16).cpu()
    for i, (start, n) in enumerate(chunks):
        k, v = _context(cache, tables[i], start + n)
        mask = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]  # (n, ctx) causal
        rows = slice(int(cu[i]), int(cu[i + 1]))
        torch.testing.assert_close(out[rows], _attend(q[rows], k, v, mask), rtol=1e-5, atol=1e-5)


# ---- fused elementwise kernels -------------------------------------------------------------------------

# bfloat16 within a rounding step: the interpreter's float32 -> bfloat16 cast truncates where the GPU rounds.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_the_layer(dtype):
    torch.manual_seed(4)
    norm = RMSNorm(40, 1e-5, dtype)
    norm.weight.data = torch.randn(40).to(dtype)
    x, residual = torch.randn(3, 40).to(dtype), torch.randn(3, 40).to(dtype)
    out, summed = fused.add_rms_norm(*_on_device(x, residual, norm.weight), norm.eps)
    torch.testing.assert_close(summed.cpu(), x + residual, **TOL[dtype])
    torch.testing.assert_close(out.cpu(), norm(x + residual), **TOL[dtype])
    alone, same = fused.add_rms_norm(*_on_device(x), None, norm.weight.to(DEVICE), norm.eps)
    torch.testing.assert_close(alone.cpu(), norm(x), **TOL[dtype])
    assert torch.equal(same.cpu(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_matches_the_layer(dtype):
    torch.manual_seed(5)
    rope = RotaryEmbedding(HD, 64, 10000.0, None)
    positions = torch.tensor([0, 7, 63, 5])
    qkv = torch.randn(4, 3 * NKV + 1, HD).to(dtype)
    expected = RotaryEmbedding.rotate(qkv[:, : 3 * NKV], rope.tables(positions, dtype))
    (qkv_dev, pos_dev, cos, sin) = _on_device(qkv, positions, rope.cos, rope.signed_sin)
    fused.rotary_(qkv_dev[:, : 3 * NKV], pos_dev, cos, sin)  # a strided view, rotated where it lies
    torch.testing.assert_close(qkv_dev[:, : 3 * NKV].cpu(), expected, **TOL[dtype])
    assert torch.equal(qkv_dev[:, 3 * NKV :].cpu(), qkv[:, 3 * NKV :])  # the V columns stay


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_ops(dtype):
    torch.manual_seed(6)
    gate_up = (3 * torch.randn(5, 2 * 1500)).to(dtype)  # two column blocks of 1024, the second partial
    gate, up = gate_up.split(1500, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up.to(DEVICE)).cpu(), F.silu(gate) * up, **TOL[dtype])


# ---- PagedAttention: the kernel path against the torch path on one mixed step --------------------------


def _mixed_step(padding: int) -> tuple[torch.Tensor, ...]:
    """A step of three decodes (+ `padding` padding rows) and two prefill chunks, as input_batch lays it out."""
    decode_lens, chunks = [6, 13, 1], [(0, 5), (8, 4)]  # decodes' context lengths; chunks' (start, tokens)
    tables = _tables(decode_lens + [s + n for s, n in chunks])
    slots = [int(tables[i, (n - 1) // BS]) * BS + (n - 1) % BS for i, n in enumerate(decode_lens)] + [-1] * padding
    for c, (start, n) in enumerate(chunks):
        table = tables[len(decode_lens) + c]
        slots += [int(table[p // BS]) * BS + p % BS for p in range(start, start + n)]
    dec_tables = torch.cat([tables[: len(decode_lens)], torch.zeros(padding, tables.shape[1], dtype=torch.int32)])
    lens = torch.tensor(decode_lens + [0] * padding, dtype=torch.int32)
    return torch.tensor(slots), dec_tables, lens, tables[len(decode_lens) :], chunks


@pytest.mark.parametrize("padding", [0, 2])
def test_paged_attention_kernel_path_equals_torch_path(padding):
    torch.manual_seed(7)
    slots, dec_tables, lens, pre_tables, chunks = _mixed_step(padding)
    nd, t = len(lens), len(slots)
    q, k, v = torch.randn(t, NKV * GROUP, HD), torch.randn(t, NKV, HD), torch.randn(t, NKV, HD)
    attn, cache = PagedAttention(NKV * GROUP, NKV, HD), _cache()
    expected_cache = cache.clone()
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=nd, block_tables=dec_tables, context_lens=lens,
                             has_padding=padding > 0)
    row = nd
    for (start, n), table in zip(chunks, pre_tables, strict=True):
        pos = torch.arange(start + n)
        ctx = table.long()[pos // BS] * BS + pos % BS
        mask = pos[None, :] <= torch.arange(start, start + n)[:, None] if start else None
        meta.prefills.append(PrefillChunk(row, n, start, ctx if start else None, mask))
        row += n
    expected = attn(q, k, v, expected_cache, meta)  # the torch path (CPU tensors)
    packed = pack_prefills([(tb.tolist(), s, n) for (s, n), tb in zip(chunks, pre_tables, strict=True)], BS, DEVICE)
    q, k, v, cache, slots, dec_tables, lens = _on_device(q, k, v, cache, slots, dec_tables, lens)
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=nd, block_tables=dec_tables, context_lens=lens,
                             packed_prefill=packed)
    got = attn._forward_kernels(ta, q, k, v, cache, meta).cpu()
    assert torch.equal(cache.cpu(), expected_cache)  # padding rows stored nothing on either path
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected[3 : 3 + padding] == 0).all()
