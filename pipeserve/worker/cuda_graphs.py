"""Decode steps replayed from CUDA graphs: one graph per (virtual engine, batch size), captured at start.

A graph bakes in the addresses of every tensor it touches, so it runs on static buffers: the decode inputs
(step_inputs.DecodeInputs), the hand-off from the previous stage (`hidden_in`, `residual_in`) and the
stage's output (`hidden_out`, `residual_out`). A step of n requests pads to the smallest captured size
>= n; padding rows point at the scratch block (see DecodeInputs). Each virtual engine has its own KV
tensors, hence its own graphs; all graphs share one memory pool, since they run one at a time. On the last
stage the graph also runs the LM head into `logits_out` and takes each row's argmax into `greedy_ids`: a step
whose requests all want the plain argmax (Sampler.plain_greedy) only copies those ids to the host, and any
other step samples from `logits_out` (logprobs, penalties and the rest need nothing the graph lacks).

Where CUDA is absent the same padded static-buffer path runs eagerly (capture does nothing, replay calls
the model on the static buffers), so a CPU test can check it against the unpadded path.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pipeserve.models.llama import LlamaForCausalLM
from pipeserve.types import IntermediateTensors
from pipeserve.worker.step_inputs import DecodeInputs

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16, and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """Static buffers and graphs for the decode steps of one stage."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[list[torch.Tensor]], inputs: DecodeInputs,
                 hidden_size: int, dtype: torch.dtype, device: str):
        self.model, self.kv_caches, self.inputs = model, kv_caches, inputs
        self.sizes = capture_sizes(inputs.max_batch)
        self.on_cuda = torch.device(device).type == "cuda"
        shape = (inputs.max_batch, hidden_size)
        self.hidden_in, self.residual_in = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(
            shape, dtype=dtype, device=device)  # (max_batch, hidden) each
        self.hidden_out, self.residual_out = torch.zeros_like(self.hidden_in), torch.zeros_like(self.hidden_in)
        self.logits_out: torch.Tensor | None = None  # (max_batch, vocab), last stage only
        self.greedy_ids: torch.Tensor | None = None  # (max_batch,) int64: each row's argmax of logits_out
        if model.stage.is_last:
            self.logits_out = torch.zeros(inputs.max_batch, model.cfg.vocab_size, dtype=dtype, device=device)
            self.greedy_ids = torch.zeros(inputs.max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served by a replayed graph
        self.capture_seconds = 0.0
        self.capture_bytes = 0  # torch.cuda.memory_allocated() grown by the capture (tensors still alive)
        self.capture_reserved_bytes = 0  # torch.cuda.memory_reserved() grown: the graphs' pool included

    def padded_size(self, n: int) -> int | None:
        """The captured size a step of n requests runs at; None past the largest."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(self) -> None:
        """Capture every (virtual engine, size), largest first so the smaller graphs fit in the pool the
        largest one sized. Does nothing without CUDA."""
        if not self.on_cuda:
            return
        start, before = time.perf_counter(), torch.cuda.memory_allocated()
        reserved = torch.cuda.memory_reserved()
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):
                for ve in range(len(self.kv_caches)):
                    self._run(ve, size)  # warm-up: lazy initialisations happen outside the capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._run(ve, size)
                    pool = graph.pool() if pool is None else pool
                    self._graphs[(ve, size)] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = torch.cuda.memory_allocated() - before
        self.capture_reserved_bytes = torch.cuda.memory_reserved() - reserved
        logger.info("captured %d CUDA graphs (%d virtual engines x batch sizes %s) in %.2f s: %.1f MiB allocated, "
                    "%.1f MiB reserved", len(self._graphs), len(self.kv_caches), self.sizes, self.capture_seconds,
                    self.capture_bytes / (1 << 20), self.capture_reserved_bytes / (1 << 20))

    def _run(self, ve: int, size: int) -> None:
        """The stage's forward on the first `size` rows of the static buffers, into the output buffers."""
        ids, positions, meta = self.inputs.views(size, self.inputs.max_blocks)
        inter = None if self.model.stage.is_first else IntermediateTensors(self.hidden_in[:size],
                                                                            self.residual_in[:size])
        out = self.model(ids, positions, self.kv_caches[ve], meta, inter)
        if isinstance(out, IntermediateTensors):
            self.hidden_out[:size].copy_(out.hidden_states)
            self.residual_out[:size].copy_(out.residual)
        else:
            self.hidden_out[:size].copy_(out)
            logits = self.model.compute_logits(out)  # (size, vocab)
            self.logits_out[:size].copy_(logits)
            self.greedy_ids[:size].copy_(logits.argmax(dim=-1))  # a float32 copy has the same argmax

    def run(self, ve: int, n: int, size: int,
            intermediate: IntermediateTensors | None) -> IntermediateTensors | torch.Tensor:
        """One decode step of n requests at captured size `size` (inputs already filled up to `size`): the
        first n rows of the stage's output, views of the static output buffers (valid until the next step; on
        the last stage `logits_out` and `greedy_ids` hold the step's logits and argmax ids too)."""
        if intermediate is not None:
            self.hidden_in[:n].copy_(intermediate.hidden_states)
            self.residual_in[:n].copy_(intermediate.residual)
        graph = self._graphs.get((ve, size))
        if graph is not None:
            graph.replay()
            self.replays += 1
        else:
            self._run(ve, size)
        if self.model.stage.is_last:
            return self.hidden_out[:n]  # (n, hidden)
        return IntermediateTensors(self.hidden_out[:n], self.residual_out[:n])

    def stats(self) -> dict[str, object]:
        return {"cuda_graph_sizes": sorted({s for _, s in self._graphs}), "cuda_graph_count": len(self._graphs),
                "cuda_graph_capture_s": self.capture_seconds, "cuda_graph_memory_bytes": self.capture_bytes,
                "cuda_graph_reserved_bytes": self.capture_reserved_bytes,
                "cuda_graph_replays": self.replays}
