"""Shared by the planner's test modules: a small model shape, the `pipeserve plan` command line, and the figures
of a calibration file."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from pipeserve.config import ModelConfig

SMALL = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "tie_word_embeddings": False}

FIGURES = {"device": "cpu", "cpu_model": "Test CPU", "torch": "2.x", "threads": 1, "measured": "2026-01-02 03:04 UTC",
           "dtype": "float32", "gemm_hidden": 64, "gemm_tflops": [[1, 0.01], [65, 0.1]], "copy_gbps": 8.0,
           "link_gbps": 2.0, "link_latency_us": 50.0}


def small(dtype=torch.bfloat16) -> ModelConfig:
    return ModelConfig.from_hf_dict("small", SMALL, dtype)


def pipeserve_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeserve.entrypoints.launch", "plan", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
