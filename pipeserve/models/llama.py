"""Llama decoder (HF `LlamaForCausalLM` math), built for one pipeline stage.

A stage creates only its own decoder layers; the others are parameter-free placeholders, so layer
indices and checkpoint names stay global. The first stage owns the embedding; the last the final norm
and the LM head (with tied embeddings, the last stage loads the embedding matrix as its head).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.config import ModelConfig
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.attention import AttentionMetadata, PagedAttention
from pipeserve.layers.kernel_select import uses_kernels
from pipeserve.layers.linear import NO_TP, ColumnParallelLinear, RowParallelLinear, default_weight_loader
from pipeserve.layers.norm import RMSNorm
from pipeserve.layers.rotary import RotaryEmbedding
from pipeserve.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pipeserve.models.rank_shapes import head_ranges
from pipeserve.types import IntermediateTensors


class PlaceholderLayer(nn.Module):
    """Stands where a layer of another stage would be: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a placeholder layer belongs to another pipeline stage and cannot run here")


class LlamaAttention(nn.Module):
    """Fused QKV projection, rotary embedding, paged attention, output projection; heads split over TP."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        hd = cfg.head_dim
        (q_start, nh), (kv_start, nkv) = head_ranges(cfg, tp.rank, tp.size)
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        qkv_rows = [(q_start * hd, nh * hd), (kv_start * hd, nkv * hd), (kv_start * hd, nkv * hd)]
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, qkv_rows, cfg.attention_bias, cfg.torch_dtype)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, cfg.attention_bias,
                                        cfg.torch_dtype, tp, in_range=(q_start * hd, nh * hd))
        self.rope = rope
        self.attn = PagedAttention(nh, nkv, hd)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (T, (nh + 2 nkv) * hd)
        t, nh, nkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        # q and k are adjacent columns of the fused output: one rotary pass over both.
        qk = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
        if meta.rope_tables is None:  # the kernel path: rotated where it lies
            qk = self.rope.rotate_(qk, meta.positions)
        else:
            qk = self.rope.rotate(qk, meta.rope_tables)
        v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
        o = self.attn(qk[:, :nh], qk[:, nh:], v, kv_cache, meta)  # (T, nh, hd)
        return self.o_proj(o.reshape(t, -1))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused; the intermediate features split over TP."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear.even(cfg.hidden_size, [inter, inter], cfg.mlp_bias, cfg.torch_dtype,
                                                      tp)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, cfg.torch_dtype, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2 * inter)
        if uses_kernels(x):
            from pipeserve.layers.fused import silu_mul

            return self.down_proj(silu_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; carries (hidden, residual) so stages can hand both over."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
        self.self_attn = LlamaAttention(cfg, rope, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
        self.mlp = LlamaMLP(cfg, tp)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.input_layernorm.add_forward(hidden, residual)
        hidden = self.self_attn(normed, kv_cache, meta)
        normed, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    """The stage's part of the model; `forward` returns IntermediateTensors, or the last stage's final hidden
    states."""

    def __init__(self, cfg: ModelConfig, stage: StageInfo, max_positions: int, tp: TPGroup = NO_TP):
        super().__init__()
        self.cfg, self.stage = cfg, stage
        self.rope = rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        v, h = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(v, h, cfg.torch_dtype, tp) if stage.is_first else PlaceholderLayer()
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rope, tp) if stage.owns_layer(i) else PlaceholderLayer()
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(h, cfg.rms_norm_eps, cfg.torch_dtype) if stage.is_last else PlaceholderLayer()
        self.lm_head = ParallelLMHead(v, h, cfg.torch_dtype, tp) if stage.is_last else PlaceholderLayer()
        if stage.is_first and stage.is_last and cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one matrix (shard) serves both ends

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata,
                intermediate: IntermediateTensors | None) -> IntermediateTensors | torch.Tensor:
        if self.stage.is_first:
            hidden, residual = self.embed_tokens(input_ids), None  # (T, hidden)
        else:
            hidden, residual = intermediate.hidden_states, intermediate.residual
        if uses_kernels(positions):
            meta.positions = positions  # the rotary kernel reads the tables itself
        else:
            meta.rope_tables = self.rope.tables(positions, self.cfg.torch_dtype)  # shared by every layer of the step
        for i in range(self.stage.start_layer, self.stage.end_layer):
            hidden, residual = self.layers[i](hidden, residual, kv_caches[i - self.stage.start_layer], meta)
        if not self.stage.is_last:
            return IntermediateTensors(hidden, residual)
        return self.norm.add_forward(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (S, vocab), gathered over TP ranks

    # ---- loading -------------------------------------------------------------------------------------

    _STACKED = {  # checkpoint projection -> (fused parameter, shard index)
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def param_for(self, ckpt_name: str) -> tuple[str, int | None] | None:
        """The (parameter name, shard) a checkpoint tensor loads into on this stage, or None if not ours."""
        name = ckpt_name
        if name == "model.embed_tokens.weight" and self.stage.is_last and self.cfg.tie_word_embeddings:
            if not self.stage.is_first:
                return "lm_head.weight", None
        name = name.removeprefix("model.")
        if name.startswith("layers."):
            if not self.stage.owns_layer(int(name.split(".")[1])):
                return None
            for ckpt, (fused, shard) in self._STACKED.items():
                if f".{ckpt}." in name:
                    return name.replace(ckpt, fused), shard
        return (name, None) if name in self._own_params else None

    @property
    def _own_params(self) -> dict[str, nn.Parameter]:
        if not hasattr(self, "_param_cache"):
            self._param_cache = dict(self.named_parameters(remove_duplicate=False))
        return self._param_cache

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (checkpoint name, tensor) pairs this stage owns; returns the parameter names filled."""
        loaded: set[str] = set()
        params = self._own_params
        for ckpt_name, tensor in weights:
            target = self.param_for(ckpt_name)
            if target is None:
                continue
            name, shard = target
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor, shard)  # a (lazy) checkpoint tensor; the loader slices it, copy_ casts it
            loaded.add(name if shard is None else f"{name}#{shard}")
        return loaded

    def expected_loads(self) -> set[str]:
        """Every (parameter#shard) a complete checkpoint must fill on this stage."""
        expected = set()
        for name, param in self._own_params.items():
            loader = getattr(param, "weight_loader", None)
            shards = getattr(getattr(loader, "__self__", None), "out_sizes", None)
            expected |= {f"{name}#{i}" for i in range(len(shards))} if shards else {name}
        if self.cfg.tie_word_embeddings and self.stage.is_first and self.stage.is_last:
            expected.discard("lm_head.weight")
        return expected
