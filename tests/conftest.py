"""Fixtures: tiny random Llama checkpoints (one per config family) and their HF reference models."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton chooses its interpreter when it is imported (transformers imports it below): without a GPU, the
    # kernel tests (tests/test_triton_kernels.py) run the kernels interpreted on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from helpers import make_tiny_llama  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

torch.set_num_threads(1)  # one CPU "device" per process, as the engine's workers run

# Each family turns on config fields that change the math, so every field is exercised against HF.
TINY_FAMILIES = {
    "gqa": dict(),
    "head_dim_bias": dict(head_dim=24, attention_bias=True, mlp_bias=True, num_key_value_heads=1, rms_norm_eps=1e-6),
    "llama3_rope_tied": dict(tie_word_embeddings=True, rope_theta=500000.0, num_key_value_heads=4,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=2.0), rope_theta=1000.0, num_hidden_layers=5),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_llama(str(root / name), seed=i, **cfg)
            for i, (name, cfg) in enumerate(TINY_FAMILIES.items())}


@pytest.fixture(scope="session")
def hf_models(tiny_models) -> dict[str, LlamaForCausalLM]:
    return {name: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in tiny_models.items()}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["gqa"]
