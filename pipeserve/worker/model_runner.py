"""Runs one stage's forward pass for a step: inputs -> layers -> hand-off tensors, or sampled tokens.

A step where every request decodes reads its inputs from persistent buffers (step_inputs.DecodeInputs) and,
on a CUDA stage whose TP group is one device, replays a captured graph (cuda_graphs.py); other steps build
their inputs afresh and run eagerly.
"""

from __future__ import annotations

import time

import torch

from pipeserve.config import ModelConfig
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.stage import StageInfo
from pipeserve.layers.linear import NO_TP
from pipeserve.layers.sampler import Sampler, read_plain, score_tokens
from pipeserve.loader.model_loader import load_model
from pipeserve.models.rank_shapes import kv_head_range
from pipeserve.timeline import StepRecord
from pipeserve.types import IntermediateTensors, SchedulerOutput, StepOutput
from pipeserve.worker.cuda_graphs import DecodeGraphs
from pipeserve.worker.gpu_timeline import GpuTimeline
from pipeserve.worker.host_staging import HostStaging
from pipeserve.worker.input_batch import InputBatch
from pipeserve.worker.kv_cache import allocate_kv_caches
from pipeserve.worker.sampled_ids import PendingStep, SampledIds, placeholder_rows
from pipeserve.worker.step_inputs import DecodeInputs, ModelInput, build_model_input, is_pure_decode


class ModelRunner:
    """Owns the stage's weights, one KV cache per virtual engine, the decode buffers and graphs.

    Each KV cache has one block past the engine's `num_blocks_per_ve`: the scratch block padding rows of a
    padded decode step write to and read from (the engine never hands it out)."""

    def __init__(self, model_cfg: ModelConfig, stage: StageInfo, *, num_blocks_per_ve: int, block_size: int,
                 num_virtual_engines: int, max_model_len: int, seed: int, device: str = "cpu",
                 disable_progress: bool = False, tp: TPGroup = NO_TP, max_num_seqs: int = 64,
                 enforce_eager: bool = False, time_gpu: bool = False, keep_sampled_ids: bool = False):
        self.stage, self.block_size, self.device = stage, block_size, device
        self.model_cfg, self.num_virtual_engines, self.max_model_len = model_cfg, num_virtual_engines, max_model_len
        self.max_num_seqs, self.kv_heads = max_num_seqs, kv_head_range(model_cfg, tp.rank, tp.size)[1]
        self.uses_graphs = not enforce_eager and torch.device(device).type == "cuda" and tp.size == 1
        self.model = load_model(model_cfg, stage, max_model_len, device, disable_progress, tp)
        self.kv_caches: list[list[torch.Tensor]] = []  # per VE, per layer; empty until allocate_kv
        self.graphs: DecodeGraphs | None = None
        if num_blocks_per_ve > 0:  # 0: the engine decides after profiling (engine/kv_sizing.py)
            self.allocate_kv(num_blocks_per_ve)
        # Every TP rank of the last stage has the full logits; rank 0 alone samples and answers the engine.
        self.samples = stage.is_last and tp.rank == 0
        self.sampler = Sampler(seed, model_cfg.eos_token_ids) if self.samples else None
        # Async scheduling (sampled_ids.py): a stage that embeds and samples keeps the ids it samples on the device.
        self.sampled_ids = SampledIds(device) if keep_sampled_ids and self.samples and stage.is_first else None
        self.last_record: StepRecord | None = None  # timing of the latest step, for traces
        # When each step ran on the GPU (benchmarks: how long the GPU waits between steps).
        self.gpu_timeline = GpuTimeline() if time_gpu and torch.device(device).type == "cuda" else None
        # Steps built afresh copy their inputs through pinned buffers on a GPU, without waiting (host_staging.py).
        self.staging = HostStaging(device) if torch.device(device).type == "cuda" else None

    def allocate_kv(self, num_blocks_per_ve: int) -> None:
        """Allocate each virtual engine's KV cache, the decode buffers that index it, and capture the graphs
        that bake in its addresses."""
        cfg, num_layers = self.model_cfg, self.stage.end_layer - self.stage.start_layer
        self.kv_caches = [allocate_kv_caches(cfg, num_layers, num_blocks_per_ve + 1, self.block_size, self.device,
                                             self.kv_heads) for _ in range(self.num_virtual_engines)]
        self.decode_inputs = DecodeInputs(self.max_num_seqs, -(-self.max_model_len // self.block_size),
                                          self.block_size, num_blocks_per_ve, self.device)
        if self.uses_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.decode_inputs, cfg.hidden_size, cfg.torch_dtype,
                                       self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, intermediate: IntermediateTensors | None = None,
                batch: InputBatch | None = None, defer: bool = False) -> IntermediateTensors | StepOutput | PendingStep:
        """Run the stage on the step; the last stage samples and returns a StepOutput. `batch`: the stage's
        persistent rows, which hold every request of the step (without them a step builds its inputs
        afresh). `defer`: a step that samples returns a PendingStep instead of waiting for its tokens."""
        start = time.time()
        gpu_start = self.gpu_timeline.mark() if self.gpu_timeline is not None else None
        if torch.autograd.profiler._is_profiler_enabled:  # a named range for benchmarks/profile_decode.py
            with torch.profiler.record_function(f"pipeserve::{sched.kind}_step"):
                out = self._forward(sched, intermediate, batch, defer)
        else:  # entering a range costs tens of microseconds even with no profiler running
            out = self._forward(sched, intermediate, batch, defer)
        if gpu_start is not None:
            self.gpu_timeline.add(sched.step_id, sched.virtual_engine, sched.kind, gpu_start)
        self.last_record = StepRecord(sched.virtual_engine, sched.step_id, self.stage.rank, start, time.time(),
                                      sched.kind, sched.num_tokens)
        return out

    def run_model(self, sched: SchedulerOutput, intermediate: IntermediateTensors | None,
                  batch: InputBatch | None = None) -> tuple[ModelInput | None, IntermediateTensors | torch.Tensor]:
        """The stage's forward pass: its inputs (None for a replayed graph, whose inputs are static) and its
        output (the last stage's final hidden states, of the sampled rows when the input is None)."""
        reqs, held = sched.requests, self.sampled_ids
        if held is not None and batch is not None:
            held.reserve(batch.block_tables.shape[0])
        if batch is not None and len(reqs) <= self.decode_inputs.max_batch and is_pure_decode(reqs):
            size = self.graphs.padded_size(len(reqs)) if self.graphs is not None else None
            inputs = self.decode_inputs
            if size is not None:
                inputs.fill(batch, reqs, size, inputs.max_blocks)
                if inputs.has_placeholders:  # before the replay, on the same stream: the graph reads the ids
                    self._kept_ids().fill(inputs.dev_long[0, :len(reqs)], inputs.persistent_rows(len(reqs)))
                return None, self.graphs.run(sched.virtual_engine, len(reqs), size, intermediate)
            inp = inputs.model_input(batch, reqs)
            if inputs.has_placeholders:
                self._kept_ids().fill(inp.input_ids, inp.persistent_rows)
        else:
            inp = build_model_input(sched, self.block_size, self.device, self.staging)
            if held is not None:
                self._fill_placeholders(inp, sched, batch)
        return inp, self.model(inp.input_ids, inp.positions, self.kv_caches[sched.virtual_engine], inp.attn,
                               intermediate)

    def _kept_ids(self) -> SampledIds:
        if self.sampled_ids is None:
            raise RuntimeError("a decode planned ahead (placeholder input id) reached a stage that keeps no sampled "
                               "ids: only the in-process executor at PP=1, TP=1 plans decodes ahead")
        return self.sampled_ids

    def _fill_placeholders(self, inp: ModelInput, sched: SchedulerOutput, batch: InputBatch | None) -> None:
        """A step built afresh (a mixed step) may hold decodes planned ahead: their rows are the first ones."""
        decodes = [r for r in sched.requests if r.is_decode]
        at = placeholder_rows(decodes)
        if at:
            rows = batch.rows([decodes[i].req_id for i in at]).tolist()
            self.sampled_ids.fill_at(inp.input_ids, at, rows)

    def _keep_ids(self, inp: ModelInput | None, reqs: list, ids: torch.Tensor, batch: InputBatch) -> None:
        """Remember the step's sampled ids by persistent row, for decodes planned before they reach the host."""
        rows = self.decode_inputs.persistent_rows(len(reqs)) if inp is None else inp.persistent_rows
        if rows is None:
            rows = self.sampled_ids.to_device(batch.rows([r.req_id for r in reqs]).tolist())
        self.sampled_ids.record(rows, ids)

    def _forward(self, sched: SchedulerOutput, intermediate: IntermediateTensors | None,
                 batch: InputBatch | None, defer: bool = False):
        inp, out = self.run_model(sched, intermediate, batch)
        if not self.stage.is_last:
            return out
        step = StepOutput(step_id=sched.step_id, virtual_engine=sched.virtual_engine)
        if inp is not None and inp.prompt_scored:
            self._score_prompts(out, inp, step)
        reqs = sched.requests if inp is None else inp.sampled_requests
        if not reqs:
            return step
        if inp is None:  # a static decode step: the LM head and the argmax ran with the layers
            logits = self.graphs.logits_out[: len(reqs)]  # (S, vocab)
        else:
            rows = inp.sample_rows
            logits = self.model.compute_logits(out if rows is None else out[rows])  # (S, vocab)
        if not self.samples:
            return step
        params, num_outputs = [r.sampling_params for r in reqs], [r.num_output_tokens for r in reqs]
        if inp is None and Sampler.plain_greedy(params, num_outputs):
            ids = self.graphs.greedy_ids[: len(reqs)]
            packed, read = ids, read_plain
        else:
            ids, packed, read = self.sampler.issue(logits, params, num_outputs, [r.seen_token_ids for r in reqs])
        if self.sampled_ids is not None and batch is not None:
            self._keep_ids(inp, reqs, ids, batch)
        pending = PendingStep(step, reqs, packed, read)  # the step's one device-to-host copy
        return pending if defer else pending.result()

    def _score_prompts(self, hidden: torch.Tensor, inp, step: StepOutput) -> None:
        """Prompt logprobs: each row of a scored chunk predicts the next prompt token (up to the last one)."""
        for r, row in inp.prompt_scored:
            prompt = r.prompt_token_ids
            n = min(r.num_tokens, len(prompt) - 1 - r.start_pos)  # rows whose next token is a prompt token
            logits = self.model.compute_logits(hidden[row: row + n])  # every TP rank takes part
            if self.samples:
                targets = prompt[r.start_pos + 1: r.start_pos + 1 + n]
                step.prompt_logprobs[r.req_id] = (r.start_pos, score_tokens(logits, targets, r.prompt_logprobs))
