"""Builds the stage's part of the model and fills it from an HF folder or a GGUF file."""

from __future__ import annotations

import torch

from pipeserve.config import ModelConfig
from pipeserve.distributed.stage import StageInfo
from pipeserve.models.llama import LlamaForCausalLM


def load_model(cfg: ModelConfig, stage: StageInfo, max_positions: int, device: str = "cpu",
               disable_progress: bool = False) -> LlamaForCausalLM:
    """Create the stage's modules and load exactly the checkpoint tensors they own."""
    with torch.device(device):
        model = LlamaForCausalLM(cfg, stage, max_positions)
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
