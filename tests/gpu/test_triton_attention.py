"""The Triton attention and fused kernels compiled on CUDA at model-sized shapes, against torch references in
bfloat16, and a printed timing of decode attention (the kernel against the gather path; no asserts on time).

`pytest -s tests/gpu/test_triton_attention.py` shows the timing table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeserve.bench.kernel_count import cuda_time_us
from pipeserve.layers.attention import AttentionMetadata, PagedAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
triton = pytest.importorskip("triton", reason="triton is not installed")

from pipeserve.layers import fused, triton_attention  # noqa: E402
from pipeserve.layers.norm import RMSNorm  # noqa: E402
from pipeserve.layers.rotary import RotaryEmbedding  # noqa: E402

NH, NKV, HD, BS = 32, 8, 128, 16  # Llama-3.1-8B's attention; 16-token blocks
BF16 = dict(rtol=2e-2, atol=2e-2)


def _setup(lengths: list[int], dtype=torch.bfloat16, nh=NH, nkv=NKV, hd=HD):
    num_blocks = sum(-(-n // BS) for n in lengths) + 8
    cache = torch.randn(2, nkv, num_blocks, BS, hd, dtype=dtype, device="cuda")
    width = max(1, max(-(-n // BS) for n in lengths))
    free = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for i, n in enumerate(lengths):
        tables[i, : -(-n // BS)] = torch.tensor([free.pop() for _ in range(-(-n // BS))], dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    return cache, tables.cuda(), lens


def _reference(q, cache, table, n, mask=None):
    """q (m, nh, hd) over positions 0..n-1 of one request, float32."""
    pos = torch.arange(n, device="cuda")
    blocks = table.long()[pos // BS]
    k, v = cache[0][:, blocks, pos % BS].float(), cache[1][:, blocks, pos % BS].float()  # (nkv, n, hd)
    o = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                       scale=q.shape[-1] ** -0.5, enable_gqa=True)
    return o[0].transpose(0, 1)


def test_decode_model_shapes():
    torch.manual_seed(0)
    lengths = [1, 0, 17, 640, 2047, 4100, 33, 0]
    cache, tables, lens = _setup(lengths)
    q = torch.randn(len(lengths), NH, HD, dtype=torch.bfloat16, device="cuda")
    for splits in (None, 1, 16):
        out = triton_attention.paged_decode(q, cache, tables, lens, HD**-0.5, num_splits=splits)
        assert not out.isnan().any()
        for i, n in enumerate(lengths):
            if n == 0:
                assert (out[i] == 0).all()
            else:
                torch.testing.assert_close(out[i].float(), _reference(q[i : i + 1], cache, tables[i], n)[0], **BF16)


def test_prefill_model_shapes():
    torch.manual_seed(1)
    chunks = [(0, 300), (512, 200), (17, 1), (0, 1000)]
    cache, tables, _ = _setup([s + n for s, n in chunks])
    cu = torch.tensor([0] + [n for _, n in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    starts = torch.tensor([s for s, _ in chunks], dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), NH, HD, dtype=torch.bfloat16, device="cuda")
    out = triton_attention.paged_prefill(q, cache, tables, cu, starts, max(n for _, n in chunks), HD**-0.5)
    for i, (s, n) in enumerate(chunks):
        mask = torch.arange(s + n, device="cuda")[None, :] <= torch.arange(s, s + n, device="cuda")[:, None]
        rows = slice(int(cu[i]), int(cu[i + 1]))
        torch.testing.assert_close(out[rows].float(), _reference(q[rows], cache, tables[i], s + n, mask), **BF16)


def test_store_model_shapes():
    cache = torch.zeros(2, NKV, 64, BS, HD, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([3, -1, 1000, 17, -1], device="cuda")
    kv = torch.randn(5, 2 * NKV, HD, dtype=torch.bfloat16, device="cuda")
    triton_attention.store_kv(kv[:, :NKV], kv[:, NKV:], cache, slots)
    flat = cache.view(2, NKV, -1, HD)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[0, :, s], kv[t, :NKV]) and torch.equal(flat[1, :, s], kv[t, NKV:])
    assert int((flat != 0).any(-1).sum()) == 2 * NKV * 3


def test_fused_kernels_model_shapes():
    torch.manual_seed(2)
    h, inter, t = 4096, 14336, 37
    norm = RMSNorm(h, 1e-5, torch.bfloat16).cuda()
    norm.weight.data = torch.randn(h, device="cuda").bfloat16()
    x, res = torch.randn(t, h, device="cuda").bfloat16(), torch.randn(t, h, device="cuda").bfloat16()
    out, summed = fused.add_rms_norm(x, res, norm.weight, norm.eps)
    assert torch.equal(summed, x + res)
    torch.testing.assert_close(out, norm(x + res), rtol=1.6e-2, atol=1e-2)
    rope = RotaryEmbedding(HD, 8192, 500000.0, None).cuda()
    pos = torch.randint(0, 8192, (t,), device="cuda")
    qkv = torch.randn(t, NH + 2 * NKV, HD, device="cuda").bfloat16()
    expected = RotaryEmbedding.rotate(qkv[:, : NH + NKV], rope.tables(pos, torch.bfloat16))
    torch.testing.assert_close(rope.rotate_(qkv[:, : NH + NKV], pos), expected, rtol=1.6e-2, atol=1e-2)
    gate_up = torch.randn(t, 2 * inter, device="cuda").bfloat16()
    gate, up = gate_up.split(inter, -1)
    torch.testing.assert_close(fused.silu_mul(gate_up), F.silu(gate) * up, rtol=1.6e-2, atol=1e-2)


def test_print_decode_timing():
    """One layer's decode attention at Llama-3.2-1B's shape (32 heads, 8 KV heads, head_dim 64), context 640."""
    nh, nkv, hd, ctx = 32, 8, 64, 640
    print(f"\ndecode attention, one layer, {nh} heads / {nkv} KV heads / head_dim {hd}, context {ctx}, bf16")
    print(f"{'batch':>6} {'triton us':>10} {'gather us':>10} {'splits':>7}")
    for b in (1, 64, 256):
        cache, tables, lens = _setup([ctx] * b, nh=nh, nkv=nkv, hd=hd)
        q = torch.randn(b, nh, hd, dtype=torch.bfloat16, device="cuda")
        attn = PagedAttention(nh, nkv, hd)
        meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device="cuda"), num_decodes=b,
                                 block_tables=tables, context_lens=lens)
        kernel = cuda_time_us(lambda: triton_attention.paged_decode(q, cache, tables, lens, hd**-0.5))  # noqa: B023
        gather = cuda_time_us(lambda: attn._decode(q, cache, meta))  # noqa: B023
        splits = triton_attention.decode_splits(b, nkv, tables.shape[1] * BS, q.device)
        print(f"{b:>6} {kernel:>10.1f} {gather:>10.1f} {splits:>7}")
        torch.testing.assert_close(triton_attention.paged_decode(q, cache, tables, lens, hd**-0.5),
                                   attn._decode(q, cache, meta), **BF16)


def test_print_kernels_per_decode_layer():
    """GPU kernels one Llama-3.2-1B-shaped decoder layer launches for a decode step (batch 64, context 640)."""
    from pipeserve.bench.kernel_count import kernels_per_step
    from pipeserve.config import ModelConfig
    from pipeserve.models.llama import LlamaDecoderLayer

    cfg = ModelConfig.from_hf_dict("random", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                  num_hidden_layers=1, num_attention_heads=32,
                                                  num_key_value_heads=8), torch.bfloat16)
    with torch.device("cuda"):
        rope = RotaryEmbedding(cfg.head_dim, 2048, cfg.rope_theta, None)
        layer = LlamaDecoderLayer(cfg, rope, _no_tp())
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    b, ctx = 64, 640
    cache, tables, lens = _setup([ctx] * b, nh=32, nkv=8, hd=cfg.head_dim)
    slots = (tables[:, -1].long() * BS + (ctx - 1) % BS).cuda()
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=b, block_tables=tables, context_lens=lens,
                             positions=torch.full((b,), ctx - 1, device="cuda"))
    hidden, residual = (torch.randn(b, cfg.hidden_size, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    count = kernels_per_step(lambda: layer(hidden, residual, cache, meta), steps=5, device="cuda")
    print(f"\nkernels per decoder layer, decode batch {b}: {count:.0f}")
    assert count > 0


def _no_tp():
    from pipeserve.layers.linear import NO_TP

    return NO_TP
