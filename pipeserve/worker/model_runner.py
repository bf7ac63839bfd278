"""Runs one stage's forward pass for a step: inputs -> layers -> hand-off tensors, or sampled tokens."""

from __future__ import annotations

import time

import torch

from pipeserve.config import ModelConfig
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.linear import NO_TP
from pipeserve.layers.sampler import Sampler, score_tokens
from pipeserve.loader.model_loader import load_model
from pipeserve.models.llama import kv_head_range
from pipeserve.timeline import StepRecord
from pipeserve.types import IntermediateTensors, SchedulerOutput, StepOutput
from pipeserve.worker.input_batch import build_model_input
from pipeserve.worker.kv_cache import allocate_kv_caches


class ModelRunner:
    """Owns the stage's weights and one KV cache per virtual engine."""

    def __init__(self, model_cfg: ModelConfig, stage: StageInfo, *, num_blocks_per_ve: int, block_size: int,
                 num_virtual_engines: int, max_model_len: int, seed: int, device: str = "cpu",
                 disable_progress: bool = False, tp: TPGroup = NO_TP):
        self.stage, self.block_size, self.device = stage, block_size, device
        self.model = load_model(model_cfg, stage, max_model_len, device, disable_progress, tp)
        num_layers = stage.end_layer - stage.start_layer
        kv_heads = kv_head_range(model_cfg, tp)[1]
        self.kv_caches = [allocate_kv_caches(model_cfg, num_layers, num_blocks_per_ve, block_size, device, kv_heads)
                          for _ in range(num_virtual_engines)]
        # Every TP rank of the last stage has the full logits; rank 0 alone samples and answers the engine.
        self.samples = stage.is_last and tp.rank == 0
        self.sampler = Sampler(seed, model_cfg.eos_token_ids) if self.samples else None
        self.last_record: StepRecord | None = None  # timing of the latest step, for traces

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput,
                intermediate: IntermediateTensors | None = None) -> IntermediateTensors | StepOutput:
        """Run the stage on the step; the last stage samples and returns a StepOutput."""
        start = time.time()
        # A named range for torch.profiler (benchmarks/profile_decode.py); near free when no profiler runs.
        with torch.profiler.record_function(f"pipeserve::{sched.kind}_step"):
            out = self._forward(sched, intermediate)
        self.last_record = StepRecord(sched.virtual_engine, sched.step_id, self.stage.rank, start, time.time(),
                                      sched.kind, sched.num_tokens)
        return out

    def _forward(self, sched: SchedulerOutput, intermediate: IntermediateTensors | None):
        inp = build_model_input(sched, self.block_size, self.device)
        out = self.model(inp.input_ids, inp.positions, self.kv_caches[sched.virtual_engine], inp.attn, intermediate)
        if not self.stage.is_last:
            return out
        step = StepOutput(step_id=sched.step_id, virtual_engine=sched.virtual_engine)
        if inp.prompt_scored:
            self._score_prompts(out, inp, step)
        if not inp.sampled_requests:
            return step
        logits = self.model.compute_logits(out[inp.sample_rows])  # (S, vocab)
        if not self.samples:
            return step
        reqs = inp.sampled_requests
        tokens = self.sampler(logits, [r.sampling_params for r in reqs], [r.num_output_tokens for r in reqs],
                              [r.seen_token_ids for r in reqs])
        step.sampled = {r.req_id: t.token_id for r, t in zip(reqs, tokens, strict=True)}
        step.logprobs = {r.req_id: t for r, t in zip(reqs, tokens, strict=True)
                         if r.sampling_params.logprobs is not None}
        return step

    def _score_prompts(self, hidden: torch.Tensor, inp, step: StepOutput) -> None:
        """Prompt logprobs: each row of a scored chunk predicts the next prompt token (up to the last one)."""
        for r, row in inp.prompt_scored:
            prompt = r.prompt_token_ids
            n = min(r.num_tokens, len(prompt) - 1 - r.start_pos)  # rows whose next token is a prompt token
            logits = self.model.compute_logits(hidden[row: row + n])  # every TP rank takes part
            if self.samples:
                targets = prompt[r.start_pos + 1: r.start_pos + 1 + n]
                step.prompt_logprobs[r.req_id] = (r.start_pos, score_tokens(logits, targets, r.prompt_logprobs))
