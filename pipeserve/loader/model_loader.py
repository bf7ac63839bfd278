"""Builds the stage's part of the model and fills it from an HF folder or a GGUF file."""

from __future__ import annotations

import torch

from pipeserve.config import ModelConfig
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.linear import NO_TP
from pipeserve.models.llama import LlamaForCausalLM


def load_model(cfg: ModelConfig, stage: StageInfo, max_positions: int, device: str = "cpu",
               disable_progress: bool = False, tp: TPGroup = NO_TP) -> LlamaForCausalLM:
    """Create the stage's modules (this TP rank's shards) and load the checkpoint tensors they own.

    Each tensor the stage owns is read once and each layer keeps only its TP rank's slice of it."""
    with torch.device(device):
        model = LlamaForCausalLM(cfg, stage, max_positions, tp)
    wanted = lambda name: model.param_for(name) is not None  # noqa: E731
    if cfg.is_gguf:
        from pipeserve.loader.gguf_loader import iter_gguf_tensors

        weights = iter_gguf_tensors(cfg.path, wanted, disable_progress=disable_progress)
    else:
        from pipeserve.loader.safetensors_loader import iter_safetensors

        weights = iter_safetensors(cfg.path, wanted, disable_progress=disable_progress)
    loaded = model.load_weights(weights)
    missing = model.expected_loads() - loaded
    if missing:
        raise ValueError(f"checkpoint {cfg.path!r} lacks tensors for stage {stage.rank}: {sorted(missing)[:8]}")
    return model.eval()
