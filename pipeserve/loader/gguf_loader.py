"""Read llama-architecture GGUF files as HF-style config, tensors and tokenizer.

GGUF is llama.cpp's single-file format. The rest of pipeserve speaks HF
`LlamaForCausalLM` (config keys, parameter names, rotary layout), so this module
translates at the boundary: metadata -> `config.json`-shaped dict, GGUF tensor
names -> HF parameter names, quantized blocks -> float32, and llama.cpp's
interleaved q/k rotary row order -> HF's half-split order.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf.quants import dequantize
from tqdm import tqdm

from pipeserve.layers.quantization import Int4Codes
from pipeserve.loader.gguf_index import GGUFIndex, GGUFTensor
from pipeserve.loader.gguf_quant import INT4_TYPES, int4_codes
from pipeserve.loader.tokenizer_cache import cached_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_ARCH = "llama"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF per-block tensor stem -> HF module path inside `model.layers.N`.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# `rope_freqs.weight` carries Llama-3.1-style per-frequency rope scaling factors.
# HF models have no such parameter (they recompute it from `rope_scaling`, which
# the GGUF metadata does not record for llama3), so we skip it: such a model runs
# with plain rope, which can drift from the reference on long-range positions.
_IGNORED = frozenset({"rope_freqs.weight"})


def _field(reader: GGUFIndex, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list, or `default` when absent."""
    return reader.get(key, default)


def _require(reader: GGUFIndex, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF file has no {key!r} metadata")
    return value


def _check_arch(reader: GGUFIndex) -> None:
    arch = _field(reader, "general.architecture")
    if arch != _ARCH:
        raise ValueError(f"GGUF architecture {arch!r} is not supported: pipeserve reads only 'llama' files")


def gguf_to_hf_name(name: str) -> str | None:
    """HF `LlamaForCausalLM` parameter name for a GGUF tensor name, or None if it has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, stem, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[stem]}.{kind}"


def _vocab_size(reader: GGUFIndex) -> int:
    """Rows of the embedding matrix: what the weights need, even if the token list is padded."""
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # GGUF lists dims fastest-first, so rows come last
    return len(_require(reader, "tokenizer.ggml.tokens"))


def _rope_scaling(reader: GGUFIndex) -> dict[str, Any] | None:
    kind = _field(reader, f"{_ARCH}.rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_require(reader, f"{_ARCH}.rope.scaling.factor"))}
    if kind not in (None, "none"):
        logger.warning("GGUF rope scaling type %r is not supported; using plain rope", kind)
    return None


def _config_from_reader(reader: GGUFIndex) -> dict[str, Any]:
    _check_arch(reader)
    names = {t.name for t in reader.tensors}
    hidden = int(_require(reader, "llama.embedding_length"))
    heads = int(_require(reader, "llama.attention.head_count"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _vocab_size(reader),
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_require(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader),
        "max_position_embeddings": int(_require(reader, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "float32",
    }


def gguf_hf_config(path: str) -> dict[str, Any]:
    """Metadata of a llama GGUF file as a HF `config.json`-style dict for LlamaForCausalLM.

    Raises ValueError when the architecture is not llama or a required key is missing.
    """
    return _config_from_reader(GGUFIndex(path))


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows of each head: interleaved pairs -> halves).

    The converter viewed each head's rows as (2, half) and stored them as (half, 2);
    viewing the stored rows as (half, 2) and swapping back restores HF order. Works
    for weights (rows, cols) and biases (rows,) alike.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rotary rows do not split into {n_head} heads of pairs")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_torch(tensor: GGUFTensor, heads: int, kv_heads: int, keep_int4: bool = False) -> torch.Tensor | Int4Codes:
    """Dequantize one GGUF tensor into a float32 torch tensor in HF shape and row order (4-bit blocks as
    exact Int4Codes when `keep_int4`)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are fastest-first
    if keep_int4 and tensor.tensor_type in INT4_TYPES and len(shape) == 2:
        codes = int4_codes(tensor.data, tensor.tensor_type, shape)
        n_head = heads if ".attn_q." in tensor.name else kv_heads if ".attn_k." in tensor.name else 0
        if n_head:  # the rotary row order applies to codes, scales and zeros alike
            codes = Int4Codes(*(torch.from_numpy(np.ascontiguousarray(_unpermute_rotary(t.numpy(), n_head)))
                                for t in (codes.codes, codes.scales, codes.zeros)))
        return codes
    arr = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    if ".attn_q." in tensor.name:
        arr = _unpermute_rotary(arr, heads)
    elif ".attn_k." in tensor.name:
        arr = _unpermute_rotary(arr, kv_heads)
    if np.may_share_memory(arr, tensor.data) or not arr.flags.c_contiguous:
        # F32 tensors come back as views of the read-only memmap; own the bytes so
        # the tensor is writable and the file mapping can be dropped.
        arr = np.ascontiguousarray(arr).copy()
    return torch.from_numpy(arr)


def _wanted_tensors(
    reader: GGUFIndex, wanted: Callable[[str], bool]
) -> list[tuple[str, GGUFTensor]]:
    """(HF name, GGUF tensor) pairs whose HF name passes `wanted`; reads no tensor data."""
    selected = []
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            if tensor.name not in _IGNORED:
                logger.warning("skipping GGUF tensor %r: no HF Llama parameter for it", tensor.name)
            continue
        if wanted(hf_name):
            selected.append((hf_name, tensor))
    return selected


def iter_gguf_tensors(
    path: str, wanted: Callable[[str], bool], *, disable_progress: bool = False, keep_int4: bool = False
) -> Iterator[tuple[str, torch.Tensor | Int4Codes]]:
    """Yield (HF parameter name, float32 tensor) for each GGUF tensor whose HF name passes `wanted`.

    Tensors that are not wanted are never read or dequantized (the file is
    memory-mapped), so a pipeline stage pays only for its own layers. q/k
    projections are returned in HF rotary row order. With `keep_int4`, Q4_0/Q4_1 matrices come as exact
    Int4Codes (which also materialize to the same float32 values).
    """
    reader = GGUFIndex(path)
    _check_arch(reader)
    heads = int(_require(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    selected = _wanted_tensors(reader, wanted)
    desc = f"loading {os.path.basename(path)}"
    for hf_name, tensor in tqdm(selected, desc=desc, unit="tensor", disable=disable_progress):
        yield hf_name, _to_torch(tensor, heads, kv_heads, keep_int4)


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A transformers tokenizer rebuilt from the GGUF's tokenizer metadata, chat template included (converted
    once, then loaded from the cache: see tokenizer_cache.py)."""
    from transformers import AutoTokenizer  # heavy import, only needed by the front end

    path = os.path.abspath(path)

    def build() -> PreTrainedTokenizerBase:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        if not tok.chat_template:
            template = _field(GGUFIndex(path), "tokenizer.chat_template")
            if template:
                tok.chat_template = template
        return tok

    return cached_tokenizer(path, build)
