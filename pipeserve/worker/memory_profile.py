"""One stage's memory profile on CUDA: what its steps need besides the KV pool, before the pool exists.

After loading its weights and before its KV pool is allocated, a stage runs two dummy steps on a temporary
cache (just big enough for them, freed afterwards):
* a prefill of `max_num_batched_tokens` tokens split over `max_num_seqs` requests that all sample (the widest
  logits and sampler batch a step can have): the peak it adds is the activation memory of the busiest step;
* a decode of `max_num_seqs` requests whose tables are `max_model_len` wide, the largest step a CUDA graph
  captures: its peak estimates the graphs' memory pool (they are captured after the pool is allocated).
The steps leave nothing behind: their KV goes to the temporary cache, they sample with a sampler of their
own, and no request state, step record or graph is touched. They also warm up every kernel a real step
launches: Triton compiles the store, prefill, decode and fused kernels on first use, which would otherwise
cost the first real requests seconds.
Then, with the temporary memory released, `used_bytes` reads what the device holds (every process on it).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable

import torch

from pipeserve.layers.sampler import Sampler
from pipeserve.models.rank_shapes import kv_bytes_per_block
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import IntermediateTensors, MemoryProfile, ScheduledRequest, SchedulerOutput
from pipeserve.worker.kv_cache import allocate_kv_caches
from pipeserve.worker.model_runner import ModelRunner
from pipeserve.worker.step_inputs import build_model_input


def dummy_prefill(num_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int,
                  vocab_size: int) -> tuple[SchedulerOutput, int]:
    """The largest prefill step and the number of KV blocks it writes (each request its own blocks)."""
    num_tokens = min(num_tokens, max_num_seqs * max_model_len)  # no step holds more
    n = min(max_num_seqs, num_tokens)
    lengths = [num_tokens // n + (i < num_tokens % n) for i in range(n)]  # each <= max_model_len
    reqs, next_block = [], 0
    for i, length in enumerate(lengths):
        blocks = -(-length // block_size)
        table = list(range(next_block, next_block + blocks))
        next_block += blocks
        ids = [(i + j) % vocab_size for j in range(length)]
        reqs.append(ScheduledRequest(f"profile-{i}", ids, 0, table, _params(i), samples=True))
    return SchedulerOutput(step_id=-1, virtual_engine=0, requests=reqs), next_block


def dummy_decode(max_num_seqs: int, max_model_len: int, block_size: int, num_blocks: int) -> SchedulerOutput:
    """A decode of `max_num_seqs` requests at the last position (tables `max_model_len` wide), their tables
    cycling over the temporary cache's `num_blocks` blocks."""
    width = -(-max_model_len // block_size)
    table = [b % num_blocks for b in range(width)]
    reqs = [ScheduledRequest(f"profile-{i}", [1], max_model_len - 1, table, _params(i), samples=True)
            for i in range(max_num_seqs)]
    return SchedulerOutput(step_id=-2, virtual_engine=0, requests=reqs)


def _params(i: int) -> SamplingParams:
    # Seeded top-k/top-p with logprobs: the sampler's widest path (a sort of the vocabulary, the log-softmax).
    return SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=i, logprobs=1)


def profile_memory(runner: ModelRunner, max_num_batched_tokens: int,
                   before_measuring: Callable[[], None] | None = None) -> MemoryProfile:
    """Run the dummy steps on `runner` (a CUDA stage without its KV pool) and measure. `before_measuring` runs
    once the temporary memory is released (a barrier, so that ranks sharing the device measure it when all
    of them are done)."""
    device, cfg = _indexed(runner.device), runner.model_cfg
    num_layers = runner.stage.end_layer - runner.stage.start_layer
    gc.collect()  # an earlier engine's tensors in this process, still cached by torch: give them back first
    torch.cuda.empty_cache()
    activation, decode = _dummy_steps(runner, max_num_batched_tokens)
    torch.cuda.empty_cache()  # give back the temporary cache and the activations: the reading below is what stays
    if before_measuring is not None:
        before_measuring()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(device=device_id(device), total_bytes=total, used_bytes=total - free,
                         activation_bytes=activation, graph_bytes=decode_buffer_bytes(runner, decode),
                         kv_bytes_per_block=kv_bytes_per_block(cfg, num_layers, runner.block_size, runner.kv_heads))


def _dummy_steps(runner: ModelRunner, max_num_batched_tokens: int) -> tuple[int, int]:
    """(peak of the prefill, peak of the decode), each beyond the weights and the temporary cache."""
    cfg, bs, device = runner.model_cfg, runner.block_size, _indexed(runner.device)
    prefill, blocks = dummy_prefill(max_num_batched_tokens, runner.max_num_seqs, runner.max_model_len, bs,
                                    cfg.vocab_size)
    decode = dummy_decode(runner.max_num_seqs, runner.max_model_len, bs, blocks)
    num_layers = runner.stage.end_layer - runner.stage.start_layer
    kv = allocate_kv_caches(cfg, num_layers, blocks, bs, runner.device, runner.kv_heads)  # freed on return
    prefill_peak = _peak(lambda: run_dummy_step(runner, prefill, kv), device)
    return prefill_peak, _peak(lambda: run_dummy_step(runner, decode, kv), device)


def decode_buffer_bytes(runner: ModelRunner, decode_peak: int) -> int:
    """What allocate_kv adds besides the KV pool: the decode input buffers and, with graphs, their static
    hand-off buffers and their memory pool (estimated by the eager decode step's peak)."""
    width = -(-runner.max_model_len // runner.block_size)
    inputs = runner.max_num_seqs * (4 * 8 + (1 + width) * 4)  # DecodeInputs' device buffers: int64 x 4, int32
    if not runner.uses_graphs:
        return inputs
    cfg = runner.model_cfg
    static = 4 * runner.max_num_seqs * cfg.hidden_size * cfg.dtype_bytes  # DecodeGraphs' in/out buffers
    return inputs + static + decode_peak


def device_id(device: torch.device) -> str:
    """The physical GPU, the same string in every process that uses it."""
    props = torch.cuda.get_device_properties(device)
    return f"{socket.gethostname()}:{getattr(props, 'uuid', device.index)}"


def _indexed(device: str) -> torch.device:
    """`cuda` as the device it means in this process (`cuda:N`)."""
    dev = torch.device(device)
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def _peak(step: Callable[[], None], device: torch.device) -> int:
    """Bytes a step allocates at its peak beyond what was allocated when it started."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@torch.inference_mode()
def run_dummy_step(runner: ModelRunner, sched: SchedulerOutput, kv: list[torch.Tensor]) -> None:
    """The stage's forward pass on the dummy step; the last stage also computes the logits and samples."""
    cfg, stage = runner.model_cfg, runner.stage
    inp = build_model_input(sched, runner.block_size, runner.device)
    inter = None
    if not stage.is_first:  # what the previous stage would hand over: (T, hidden) each
        shape = (inp.input_ids.shape[0], cfg.hidden_size)
        inter = IntermediateTensors(torch.zeros(shape, dtype=cfg.torch_dtype, device=runner.device),
                                    torch.zeros(shape, dtype=cfg.torch_dtype, device=runner.device))
    out = runner.model(inp.input_ids, inp.positions, kv, inp.attn, inter)
    if not stage.is_last:
        return
    logits = runner.model.compute_logits(out[inp.sample_rows])  # (S, vocab); every TP rank takes part
    if runner.samples:
        reqs = inp.sampled_requests
        sampler = Sampler(0, cfg.eos_token_ids)  # its own: the stage's sampler counts its draws
        sampler(logits, [r.sampling_params for r in reqs], [0] * len(reqs))
