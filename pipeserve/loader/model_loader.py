"""Builds the stage's part of the model and fills it from an HF folder or a GGUF file."""

from __future__ import annotations

import logging

import torch

from pipeserve.config import ModelConfig
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.linear import NO_TP, QuantizableWeight
from pipeserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def load_model(cfg: ModelConfig, stage: StageInfo, max_positions: int, device: str = "cpu",
               disable_progress: bool = False, tp: TPGroup = NO_TP) -> LlamaForCausalLM:
    """Create the stage's modules (this TP rank's shards) and load the checkpoint tensors they own.

    Each tensor the stage owns is read once and each layer keeps only its TP rank's slice of it."""
    with torch.device(device):
        model = LlamaForCausalLM(cfg, stage, max_positions, tp)
    wanted = lambda name: model.param_for(name) is not None  # noqa: E731
    if cfg.is_gguf:
        from pipeserve.loader.gguf_loader import iter_gguf_tensors

        keep_int4 = cfg.quantization in ("auto", "int4")
        weights = iter_gguf_tensors(cfg.path, wanted, disable_progress=disable_progress, keep_int4=keep_int4)
    else:
        from pipeserve.loader.safetensors_loader import iter_safetensors

        weights = iter_safetensors(cfg.path, wanted, disable_progress=disable_progress)
    loaded = model.load_weights(weights)
    missing = model.expected_loads() - loaded
    if missing:
        raise ValueError(f"checkpoint {cfg.path!r} lacks tensors for stage {stage.rank}: {sorted(missing)[:8]}")
    held = quantize_model(model, cfg)
    logger.info("stage %d (TP rank %d) holds %s", stage.rank, tp.rank, held)
    model.weights_summary = held  # a stage process reports it to the engine, which logs it (see Loaded)
    return model.eval()


def quantize_model(model: torch.nn.Module, cfg: ModelConfig) -> str:
    """Quantize the stage's matmul weights as `cfg.quantization` says; returns what it holds, for the log.

    * int4 / int8: every matmul weight, from the checkpoint's 4-bit codes where it has them (exact).
    * auto: a GGUF's Q4_0/Q4_1 weights stay exactly 4-bit; the LM head, stored Q8_0 by llama.cpp's
      converters, becomes int8 per channel (as int4 it changed 2 of 13 argmaxes on SmolLM2: docs/usage.md,
      "Quantized weights"); other tensors stay dense. HF checkpoints stay dense.
    Dense weights are kept beside quantized ones for steps of many rows, where the dense GEMM is faster.
    """
    counts: dict[str, int] = {}
    quant_bytes = dense_bytes = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantizableWeight) or module.weight.numel() == 0:
            continue
        codes = module.exact_int4()
        method = cfg.quantization
        if method == "auto":
            method = "int4" if codes is not None else "int8" if name == "lm_head" and cfg.is_gguf else "none"
        if method != "int4" or codes is None:
            module.fill_deferred_dense()
        if method != "none":
            module.quantize(method, codes if method == "int4" else None)
            quant_bytes += module.quantized.nbytes
            label = f"{method} (exact from the checkpoint)" if method == "int4" and codes is not None else method
        else:
            label = cfg.dtype
        counts[label] = counts.get(label, 0) + 1
        dense_bytes += module.weight.numel() * module.weight.element_size()
    kinds = ", ".join(f"{n} matmul{'s' * (n != 1)} {label}" for label, n in counts.items())
    return (f"{kinds}; {quant_bytes / 2**20:.0f} MiB quantized, {dense_bytes / 2**20:.0f} MiB dense "
            f"(the dense copy serves steps of more than a few rows)" if quant_bytes else kinds)
