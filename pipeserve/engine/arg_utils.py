"""`EngineArgs`: the user-facing engine settings (vLLM's names), validated into an EngineConfig."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

from pipeserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pipeserve.distributed.partition import parse_partition
from pipeserve.engine.kv_sizing import check_kv_capacity
from pipeserve.loader.default_model import resolve_model_path
from pipeserve.loader.model_config import load_model_config
from pipeserve.models.rank_shapes import kv_bytes_per_block, kv_head_range

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 2.0  # a CPU stage's KV budget unless told otherwise (a CPU's memory is not profiled)


@dataclass
class EngineArgs:
    """Everything `LLM(...)` and the CLI's engine flags accept."""

    model: str | None = None
    dtype: str = "auto"
    quantization: str = "none"  # dense: batch-invariant; the quantized kernels are opt-in (engine_flags.py)
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # default: 64 on CPU, 256 on CUDA
    max_num_batched_tokens: int | None = None  # default: 512 on CPU, 8192 on CUDA (max_model_len unchunked)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None  # default: 2 on CPU; on CUDA unset: sized by gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # CUDA: share of each device's memory the stages use, KV pool included
    seed: int = 0
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    pp_layer_partition: str | None = None
    num_virtual_engines: int | None = None
    max_steps_in_flight_per_ve: int | None = None
    async_scheduling: bool | None = None  # default: on for CUDA, off for CPU
    threads_per_worker: int | None = None
    device: str | None = None
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    cluster_key: str | None = None
    join_timeout_s: float = 120.0
    step_timeout_s: float = 60.0
    max_stage_restarts: int = 3
    restart_window_s: float = 600.0
    node_rejoin_timeout_s: float = 60.0
    trace_file: str | None = None
    record_steps: bool = False  # keep step records for timelines without writing a trace (benchmarks)
    enforce_eager: bool = False  # no CUDA graphs: every decode step runs eagerly
    distributed_executor_backend: str = "mp"
    ray_address: str | None = None
    ray_cpus_per_rank: float = 1.0
    max_stop_strings: int = 64
    max_stop_string_length: int = 1024

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def create_engine_config(self) -> EngineConfig:
        """Resolve defaults and check every limit, raising ValueError that names the bad setting."""
        path = resolve_model_path(self.model)
        model = load_model_config(path, self.dtype, self.quantization)
        max_len = self.max_model_len or min(model.max_position_embeddings, 4096)
        if max_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_len}")
        if max_len > model.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                             f"{model.max_position_embeddings}")
        parallel = self._parallel_config(model)
        scheduler = self.scheduler_config(max_len, self.pipeline_parallel_size, parallel.device)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        cache = self._cache_config(parallel.device)
        num_ve = parallel.pipeline_parallel_size if self.num_virtual_engines is None else self.num_virtual_engines
        if num_ve < 1:
            raise ValueError(f"num_virtual_engines must be >= 1, got {num_ve}")
        blocks = 0  # CUDA without a budget: the stages profile their memory at start (engine/kv_sizing.py)
        if cache.num_kv_blocks is not None or cache.kv_cache_memory_bytes is not None:
            # Every stage holds the same number of blocks; the stage with the most layers sets how many fit.
            blocks = self.num_blocks_from_memory(model, cache, max(parallel.stage_layers),
                                                 parallel.tensor_parallel_size)
            blocks //= num_ve
            check_kv_capacity(blocks, self.block_size, max_len, "raise num_kv_blocks / kv_cache_memory_gb")
        for name in ("max_stop_strings", "max_stop_string_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return EngineConfig(model, cache, scheduler, parallel, self.seed, num_ve, blocks, self.trace_file,
                            self.record_steps or self.trace_file is not None, self.enforce_eager,
                            self.max_stop_strings, self.max_stop_string_length)

    def _cache_config(self, device: str) -> CacheConfig:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        budget_gb = self.kv_cache_memory_gb
        if budget_gb is None and not device.startswith("cuda"):
            budget_gb = CPU_KV_CACHE_GB
        if budget_gb is not None and budget_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {budget_gb}")
        budget = None if budget_gb is None else int(budget_gb * (1 << 30))
        return CacheConfig(block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                           kv_cache_memory_bytes=budget, gpu_memory_utilization=self.gpu_memory_utilization,
                           enable_prefix_caching=self.enable_prefix_caching)

    def _parallel_config(self, model: ModelConfig) -> ParallelConfig:
        pp, tp = self.pipeline_parallel_size, self.tensor_parallel_size
        if pp < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp}")
        check_tensor_parallel(model, tp)
        sizes = parse_partition(self.pp_layer_partition, model, pp)
        import torch  # here, not at the top: `pipeserve plan` checks layouts through this module without torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device {device!r} is not 'cpu' or 'cuda'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but this torch build sees no CUDA device")
        threads = self.threads_per_worker
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // (pp * tp))
        if threads < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {threads}")
        self._check_nodes(pp * tp, tp)
        self._check_recovery()
        self._check_backend()
        return ParallelConfig(pipeline_parallel_size=pp, tensor_parallel_size=tp, stage_layers=tuple(sizes),
                              threads_per_worker=threads, device=device, master_addr=self.master_addr,
                              master_port=self.master_port, nnodes=self.nnodes, cluster_key=self.cluster_key,
                              join_timeout_s=self.join_timeout_s, step_timeout_s=self.step_timeout_s,
                              max_stage_restarts=self.max_stage_restarts, restart_window_s=self.restart_window_s,
                              node_rejoin_timeout_s=self.node_rejoin_timeout_s,
                              distributed_executor_backend=self.distributed_executor_backend,
                              ray_address=self.ray_address, ray_cpus_per_rank=self.ray_cpus_per_rank)

    def _check_recovery(self) -> None:
        for name in ("step_timeout_s", "restart_window_s", "node_rejoin_timeout_s", "join_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_stage_restarts < 0:
            raise ValueError(f"max_stage_restarts must be >= 0, got {self.max_stage_restarts}")

    def _check_backend(self) -> None:
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "mp":
            if self.ray_address is not None:
                raise ValueError("ray_address is only used with distributed_executor_backend='ray'")
            return
        if self.nnodes != 1 or self.node_rank != 0:
            raise ValueError("--nnodes/--node-rank are not used with the ray backend: Ray places the ranks on "
                             "the cluster's machines (start Ray on each machine instead of `pipeserve worker`)")
        if self.ray_cpus_per_rank <= 0:
            raise ValueError(f"ray_cpus_per_rank must be > 0, got {self.ray_cpus_per_rank}")

    def _check_nodes(self, world: int, tp: int) -> None:
        """Multi-machine layouts: the engine is node 0, ranks split evenly, and TP stays inside a node."""
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes == 1:
            return
        if self.node_rank != 0:
            raise ValueError(f"node_rank {self.node_rank}: only node 0 runs the engine; start `pipeserve worker "
                             f"--node-rank {self.node_rank}` on the other machines")
        if world % self.nnodes:
            raise ValueError(f"{world} ranks (PP x TP) do not split evenly over {self.nnodes} nodes")
        if (world // self.nnodes) % tp:  # allowed (it is what the PP-vs-TP benchmark measures), but slow
            logger.warning("tensor_parallel_size=%d spans machines (%d ranks per node): TP all-reduces twice per "
                           "layer over the slow link; prefer TP inside a node and PP across nodes",
                           tp, world // self.nnodes)
        if self.master_port is None or not self.cluster_key:
            raise ValueError("a multi-node run needs --master-port and --cluster-key (the same on every node)")

    def scheduler_config(self, max_len: int, pp: int, device: str) -> SchedulerConfig:
        """The scheduler limits `serve` runs with for these args (also what `pipeserve plan` predicts with)."""
        # A GPU is sized for wide batches (vLLM's defaults); a CPU core is saturated by far fewer rows.
        on_gpu = device.startswith("cuda")
        max_seqs = self.max_num_seqs if self.max_num_seqs is not None else (256 if on_gpu else 64)
        if max_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_seqs}")
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = (8192 if on_gpu else 512) if self.enable_chunked_prefill else max_len
        if budget < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {budget}")
        if not self.enable_chunked_prefill and budget < max_len:
            raise ValueError(f"without chunked prefill, max_num_batched_tokens ({budget}) must be >= max_model_len "
                             f"({max_len}) so that any prompt fits one step")
        in_flight = pp if self.max_steps_in_flight_per_ve is None else self.max_steps_in_flight_per_ve
        if in_flight < 1:
            raise ValueError(f"max_steps_in_flight_per_ve must be >= 1, got {in_flight}")
        async_scheduling = on_gpu if self.async_scheduling is None else self.async_scheduling
        return SchedulerConfig(max_seqs, budget, max_len, self.enable_chunked_prefill, in_flight, async_scheduling)

    def num_blocks_from_memory(self, model: ModelConfig, cache: CacheConfig, layers_on_busiest_stage: int,
                               tp: int) -> int:
        """KV blocks per rank from `num_kv_blocks` or the per-rank KV memory budget (also used by the planner)."""
        if cache.num_kv_blocks is not None:
            if cache.num_kv_blocks < 1:
                raise ValueError(f"num_kv_blocks must be >= 1, got {cache.num_kv_blocks}")
            return cache.num_kv_blocks
        # The memory budget is per rank: under TP a rank holds only its KV heads (the most any rank holds).
        kv_heads = max(kv_head_range(model, rank, tp)[1] for rank in range(tp))
        per_block = kv_bytes_per_block(model, layers_on_busiest_stage, cache.block_size, kv_heads)
        return max(1, cache.kv_cache_memory_bytes // per_block)


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """Hidden and intermediate sizes must split evenly; heads are dealt out by KV group (see head_ranges)."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    for name, n in (("hidden_size", model.hidden_size), ("intermediate_size", model.intermediate_size)):
        if n % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {name}={n}")
    nkv, group = model.num_key_value_heads, model.num_attention_heads // model.num_key_value_heads
    if tp > nkv and (tp % nkv or group % (tp // nkv)):
        raise ValueError(f"tensor_parallel_size={tp} cannot share {nkv} KV heads of {group} query heads each")
