"""What one tensor-parallel rank of a Llama holds: its attention heads and the bytes of its KV blocks. Pure
arithmetic on the config, shared by the model's layers, the KV sizing of `serve` and `pipeserve plan` (which
answers without importing torch)."""

from __future__ import annotations

from pipeserve.config import ModelConfig


def head_ranges(cfg: ModelConfig, tp_rank: int, tp_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first query head, count), (first KV head, count)) held by TP rank `tp_rank` of `tp_size`.

    Heads are dealt out by KV group (a KV head and the query heads that read it), as evenly as the group
    count allows: SmolLM2's 3 groups over 2 ranks give 2 and 1. With more ranks than KV heads, each KV head
    is replicated on T / n_kv ranks, which split its query heads.
    """
    nkv, nh = cfg.num_key_value_heads, cfg.num_attention_heads
    group = nh // nkv
    if tp_size <= nkv:
        base, extra = divmod(nkv, tp_size)
        kv_start, kv_count = tp_rank * base + min(tp_rank, extra), base + (tp_rank < extra)
        return (kv_start * group, kv_count * group), (kv_start, kv_count)
    share = tp_size // nkv
    if tp_size % nkv or group % share:
        raise ValueError(f"tensor_parallel_size={tp_size} cannot share {nkv} KV heads of {group} query heads each")
    kv, per_rank = tp_rank // share, group // share
    return (kv * group + (tp_rank % share) * per_rank, per_rank), (kv, 1)


def kv_head_range(cfg: ModelConfig, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(first KV head, count) TP rank `tp_rank` of `tp_size` holds."""
    return head_ranges(cfg, tp_rank, tp_size)[1]


def kv_bytes_per_block(cfg: ModelConfig, num_layers: int, block_size: int, num_kv_heads: int | None = None) -> int:
    """Bytes one block costs on a rank that holds `num_layers` layers and `num_kv_heads` KV heads (K and V)."""
    return 2 * num_layers * block_size * (num_kv_heads or cfg.num_key_value_heads) * cfg.head_dim * cfg.dtype_bytes
