"""The model a plan is for: a built-in shape (no download), or whatever `serve` takes, read as config only."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeserve.config import ModelConfig, resolve_dtype

# Config values as the models' published config.json files give them (Meta's Llama 3 / 3.1 model cards).
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {**_LLAMA3, "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_scaling": _LLAMA32_ROPE},
    "llama-3-8b": {**_LLAMA3, "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192},
    "llama-3-70b": {**_LLAMA3, "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192},
    "llama-3.1-405b": {**_LLAMA3, "num_hidden_layers": 126, "hidden_size": 16384, "intermediate_size": 53248,
                       "num_attention_heads": 128, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                       "rope_scaling": _LLAMA31_ROPE},
}


def plan_model_config(model: str, dtype: str, device_kind: str) -> ModelConfig:
    """A built-in shape by name, else the config `serve` would read for `model` (no weights are opened).
    `device_kind` is "cuda" or "cpu": what `--dtype auto` resolves for."""
    resolved = resolve_dtype(dtype, device_kind)
    if model in BUILTIN_SHAPES:
        return ModelConfig.from_hf_dict(model, BUILTIN_SHAPES[model], resolved)
    from pipeserve.loader.default_model import resolve_model_path
    from pipeserve.loader.model_config import load_model_config

    try:
        path = resolve_model_path(model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{exc}; built-in shapes: {', '.join(BUILTIN_SHAPES)}") from None
    return replace(load_model_config(path), dtype=resolved)
