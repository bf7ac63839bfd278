"""A checkpoint's `ModelConfig`: an HF folder's config.json, or a GGUF file's metadata in HF's shape."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from pipeserve.config import QUANTIZATION_METHODS, ModelConfig, resolve_dtype


def load_model_config(path: str, dtype: str = "auto", quantization: str = "none") -> ModelConfig:
    """Read the config of an HF folder or a GGUF file at `path` (already resolved to exist)."""
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATION_METHODS)}")
    if path.endswith(".gguf"):
        from pipeserve.loader.gguf_loader import gguf_hf_config  # the gguf reader, only for GGUF files

        cfg = gguf_hf_config(path)
    else:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(f"model folder {path!r} has no config.json")
        with open(cfg_file) as f:
            cfg = json.load(f)
    return replace(ModelConfig.from_hf_dict(path, cfg, resolve_dtype(dtype)), quantization=quantization)
