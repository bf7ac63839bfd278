"""Random-weight Llama checkpoints written on the device, and the arithmetic of their limits: bytes a decode
step reads, FLOPs a prefill computes."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B, and a tiny one for the CPU smoke run
    "1B": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
WEIGHT_STD = 0.02  # keeps activations of a random deep stack finite in bf16
SHARD_BYTES = 2 << 30


def hf_config(shape: dict, dtype: torch.dtype) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."), **shape}


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, in HF Llama's names."""
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,)}
    if not shape["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def write_checkpoint(folder: str, shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> str:
    """An HF folder (config.json, sharded safetensors and their index) of random weights drawn on `device`."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:  # written as soon as a shard is full: the device holds one shard at a time
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, dims in tensor_shapes(shape).items():
        if name.endswith("norm.weight"):
            t = torch.ones(dims, device=device, dtype=dtype)
        else:
            t = (torch.randn(dims, device=device, dtype=torch.float32, generator=g) * WEIGHT_STD).to(dtype)
        held = sum(x.numel() * x.element_size() for x in shard.values())
        if shard and held + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[name] = t
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(shape, dtype), f, indent=1)
    return folder


def weight_bytes_per_step(shape: dict, dtype_bytes: int) -> int:
    """Bytes of weights a decode step reads: every matrix but an untied input embedding (a lookup reads
    only the batch's rows; a tied one is read whole as the LM head)."""
    total = sum(_numel(d) for d in tensor_shapes(shape).values())
    if not shape["tie_word_embeddings"]:
        total -= shape["vocab_size"] * shape["hidden_size"]
    return total * dtype_bytes


def kv_bytes_per_token(shape: dict, dtype_bytes: int) -> int:
    d = shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * d * dtype_bytes


def prefill_flops(shape: dict, num_prompts: int, input_len: int) -> float:
    """Matmul FLOPs of the prompts' prefill: the layers for every token, causal attention, and the LM head
    for the last token of each prompt."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    layer_params = sum(_numel(d) for n, d in tensor_shapes(shape).items() if ".layers.0." in n and len(d) == 2)
    attention = 2 * layers * h * input_len * input_len  # QK^T and PV over the causal half: 2 * (2 * L^2 / 2) * h
    return num_prompts * (2 * layers * layer_params * input_len + attention + 2 * shape["vocab_size"] * h)


def decode_limit_s(shape: dict, dtype_bytes: int, batch: int, context_lens: list[int], bandwidth: float) -> float:
    """Seconds the decode steps need at `bandwidth` bytes/s: each step reads the weights once and every
    request's KV up to its context (`context_lens`, one entry per step)."""
    weights, per_token = weight_bytes_per_step(shape, dtype_bytes), kv_bytes_per_token(shape, dtype_bytes)
    return sum(weights + batch * ctx * per_token for ctx in context_lens) / bandwidth


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
