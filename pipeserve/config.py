"""Frozen configuration records. Each component takes only the one it needs.

Reading a checkpoint's config (HF folder or GGUF file) is the loader's job: `loader/model_config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a model runs in, by name
QUANTIZATION_METHODS = ("auto", "none", "int8", "int4")  # ModelConfig.quantization (layers/quantization.py)


@dataclass(frozen=True)
class ModelConfig:
    """The Llama architecture numbers that change the math (mirrors HF `LlamaConfig`)."""

    path: str  # HF folder or .gguf file
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # The dtype's name (a key of DTYPE_BYTES): the record stays free of torch, so planning a layout never imports
    # it; a torch.dtype given here is stored by its name. The engine's tensors take `torch_dtype`.
    dtype: str = "float32"
    quantization: str = "none"  # weight-only: none, int8, int4, or auto (a GGUF's 4-bit blocks kept 4-bit)

    def __post_init__(self) -> None:
        name = dtype_name(self.dtype)
        if name not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        object.__setattr__(self, "dtype", name)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")

    @staticmethod
    def from_hf_dict(path: str, cfg: dict[str, Any], dtype: str | torch.dtype) -> ModelConfig:
        """Build from a `config.json`-shaped dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        arch = cfg.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"model {path!r} has model_type {arch!r}; pipeserve runs Llama-architecture models")
        heads = cfg["num_attention_heads"]
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return ModelConfig(
            path=path,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype,
        )


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_name(dtype: str | torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16 (or "bfloat16"): how configs and calibration files name a dtype."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype, device: str = "cpu") -> str:
    """The dtype's name; `auto` is bfloat16 where the hardware computes it natively (CUDA, or CPUs with bf16
    units), else float32."""
    dtype = dtype_name(dtype)
    if dtype == "auto":
        native = device.startswith("cuda") or cpu_has_native_bf16()
        return "bfloat16" if native else "float32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPE_BYTES)}")
    return dtype


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing. `num_kv_blocks` wins over the memory budget, which wins over the device fraction."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = 2 << 30  # budget per stage; None: sized from gpu_memory_utilization
    enable_prefix_caching: bool = True  # reuse the KV of full blocks whose prefix was computed before
    # On CUDA without a budget: the share of each device's memory the engine's stages may use in all, KV
    # included; the KV pool gets what the stages' profiled step leaves of it (engine/kv_sizing.py).
    gpu_memory_utilization: float = 0.9


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits (vLLM names)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # Steps one virtual engine keeps in flight when it has work that waits on no result (the next chunk of a
    # prompt): one per pipeline stage lets a long prompt occupy every stage at once.
    max_steps_in_flight_per_ve: int = 1
    # Plan a request's next decode before its sampled token reaches the host, where the executor keeps the ids
    # on the device (engine/async_engine.py); stop and EOS then apply one step late, the extra token dropped.
    async_scheduling: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is cut: pipeline stages (layers per stage), threads and device of each model process."""

    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    stage_layers: tuple[int, ...] = ()  # decoder layers per stage, summing to the layer count
    threads_per_worker: int | None = None
    device: str = "cpu"
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: pick a free port (single machine only)
    nnodes: int = 1  # machines; this process is node 0, the others run `pipeserve worker`
    cluster_key: str | None = None  # shared secret authenticating ranks of a multi-machine cluster
    join_timeout_s: float = 120.0  # how long the engine waits for every rank to connect
    distributed_timeout_s: float = 300.0  # how long a stage waits on a peer before declaring it dead
    step_timeout_s: float = 60.0  # a step without a result this long means a stuck stage (x5 for the first steps)
    max_stage_restarts: int = 3  # recoveries allowed within restart_window_s; past that a failure is final
    restart_window_s: float = 600.0
    node_rejoin_timeout_s: float = 60.0  # how long a recovery waits for a lost machine's `pipeserve worker`
    distributed_executor_backend: str = "mp"  # mp: our own processes and node agents; ray: Ray actors
    ray_address: str | None = None  # the Ray cluster to join (None: $RAY_ADDRESS, else a local one)
    ray_cpus_per_rank: float = 1.0  # logical CPUs each rank's actor reserves


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, grouped per component."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    num_virtual_engines: int = 1
    # Resolved from CacheConfig by EngineArgs; 0 until the stages have profiled their memory (CUDA without an
    # explicit budget): the engine then decides it at start (engine/kv_sizing.py).
    num_blocks_per_ve: int = 0
    trace_file: str | None = None  # write a Chrome trace (and a PNG Gantt chart) of every stage's steps
    # Stages keep a record of each step (for the trace, or a benchmark's timeline) only when asked: kept for
    # a server that runs for weeks they would be memory spent on nothing.
    record_steps: bool = False
    # Decode steps run eagerly even where CUDA graphs could replay them (vLLM's --enforce-eager).
    enforce_eager: bool = False
    # Every stop string is searched for in a request's text after each of its tokens: a request may ask for at
    # most this many, each at most this long (OpenAI allows 4).
    max_stop_strings: int = 64
    max_stop_string_length: int = 1024

    @property
    def tokens_per_ve(self) -> int:
        return self.num_blocks_per_ve * self.cache.block_size
