"""What one TP x PP layout holds per device: weights, KV bytes per token, and the KV pool serve would size.

The partition, the TP checks, the KV heads per rank, the bytes of a KV block and the pool's sizing rule are
serve's own functions (distributed/partition.py, engine/arg_utils.py, models/llama.py, worker/kv_cache.py,
engine/kv_sizing.py), called with a memory profile written from the model's shape instead of measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeserve.config import CacheConfig, ModelConfig, SchedulerConfig
from pipeserve.distributed.partition import parse_partition
from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.engine.arg_utils import CPU_KV_CACHE_GB, EngineArgs, check_tensor_parallel
from pipeserve.engine.kv_sizing import blocks_per_ve, check_kv_capacity
from pipeserve.models.rank_shapes import head_ranges, kv_bytes_per_block
from pipeserve.planner.hardware import Device
from pipeserve.types import MemoryProfile

BLOCK_SIZE = CacheConfig().block_size
RUNTIME_RESERVE_GB = 1.0  # per device: CUDA context, allocator slack and decode graphs (an assumption)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as its busiest TP rank (rank 0: it gets the extra KV group) sees it."""

    layers: int
    first: bool
    last: bool
    q_heads: int  # query heads on the rank
    kv_heads: int  # KV heads on the rank
    vocab_rows: int  # rows of the embedding / LM head on the rank
    weight_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True)
class Layout:
    """TP x PP on `nodes` machines of `per_node` devices each (ranks TP-major, machines take consecutive runs)."""

    tp: int
    pp: int
    nodes: int
    per_node: int

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def ranks(self) -> RankLayout:
        return RankLayout(self.pp, self.tp, self.nodes)

    def tp_spans_nodes(self) -> bool:
        r = self.ranks
        return any(len({r.node_of(x) for x in r.stage_ranks(s)}) > 1 for s in range(self.pp))

    def handoff_crosses_nodes(self, stage: int) -> bool:
        """Whether stage -> stage + 1 goes between machines (for TP rank 0; the others follow the same runs)."""
        r = self.ranks
        return r.node_of(r.stage_ranks(stage)[0]) != r.node_of(r.stage_ranks(stage + 1)[0])


def check_layout(model: ModelConfig, tp: int, pp: int) -> list[int]:
    """Layers per stage, as serve would split them; ValueError with serve's message where serve rejects it."""
    check_tensor_parallel(model, tp)
    return parse_partition(None, model, pp)


def scheduler_for(max_model_len: int, pp: int, device_kind: str) -> SchedulerConfig:
    """The scheduler limits serve would run with (its defaults for the device kind)."""
    return EngineArgs(max_model_len=max_model_len).scheduler_config(max_model_len, pp, device_kind)


def layer_params(model: ModelConfig, q_heads: int, kv_heads: int, tp: int) -> int:
    """Parameters of one decoder layer on a rank holding these heads (QKV, O, gate/up/down, two norms)."""
    h, hd = model.hidden_size, model.head_dim
    attn = h * (q_heads + 2 * kv_heads) * hd + q_heads * hd * h
    mlp = 3 * h * (model.intermediate_size // tp)
    return attn + mlp + 2 * h


def build_stages(model: ModelConfig, tp: int, sizes: list[int]) -> list[Stage]:
    (_, q_heads), (_, kv_heads) = head_ranges(model, 0, tp)
    vocab_rows = -(-model.vocab_size // tp)
    elem = model.dtype_bytes
    stages = []
    for i, n in enumerate(sizes):
        first, last = i == 0, i == len(sizes) - 1
        params = n * layer_params(model, q_heads, kv_heads, tp)
        params += vocab_rows * model.hidden_size if first else 0
        if last:  # final norm and LM head; a single stage with tied embeddings shares one matrix
            params += model.hidden_size
            params += 0 if (first and model.tie_word_embeddings) else vocab_rows * model.hidden_size
        kv_per_token = kv_bytes_per_block(model, n, 1, kv_heads)
        stages.append(Stage(n, first, last, q_heads, kv_heads, vocab_rows, params * elem, kv_per_token))
    return stages


def kv_pool_bytes(stage: Stage, blocks_per_ve: int, num_ve: int) -> int:
    """The KV tensors a stage's busiest rank allocates: each VE's blocks and one scratch block (model_runner.py)."""
    return num_ve * (blocks_per_ve + 1) * BLOCK_SIZE * stage.kv_bytes_per_token


def activation_bytes(model: ModelConfig, stage: Stage, tp: int, sched: SchedulerConfig) -> int:
    """Peak a step at the largest batch adds: hidden, residual, QKV and gate/up rows of the token budget, and
    on the last stage the float32 logits of every sequence (the rank's shard, then the gathered vocabulary)."""
    h, hd, elem = model.hidden_size, model.head_dim, model.dtype_bytes
    per_token = 4 * h + (stage.q_heads + 2 * stage.kv_heads) * hd + 2 * (model.intermediate_size // tp)
    logits = sched.max_num_seqs * (stage.vocab_rows + model.vocab_size) * 4 if stage.last else 0
    return sched.max_num_batched_tokens * per_token * elem + logits


def kv_blocks_per_ve(model: ModelConfig, device: Device, layout: Layout, stages: list[Stage],
                     sched: SchedulerConfig, utilization: float, num_ve: int, num_kv_blocks: int | None = None) -> int:
    """Blocks per virtual engine by serve's rule: `num_kv_blocks` split over the VEs where given; else on a GPU
    from `gpu_memory_utilization` (engine/kv_sizing.py) with profiles written from the shape, on a CPU from
    serve's fixed KV budget per stage. ValueError (serve's message, or the weights' own) where nothing fits."""
    if num_kv_blocks is not None:
        cache = CacheConfig(block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks)
        blocks = EngineArgs().num_blocks_from_memory(model, cache, max(st.layers for st in stages), layout.tp)
        blocks //= num_ve
        check_kv_capacity(blocks, BLOCK_SIZE, sched.max_model_len, "raise num_kv_blocks")
        return blocks
    if device.name == "cpu":
        return _cpu_blocks_per_ve(model, device, layout, stages, sched, num_ve)
    total = int(device.memory_gb * 1e9)
    reserve = int(RUNTIME_RESERVE_GB * 1e9)
    allowed = total * utilization
    profiles = []
    for s, stage in enumerate(stages):
        if stage.weight_bytes + reserve > allowed:
            raise ValueError(f"stage {s}'s weights take {stage.weight_bytes / 1e9:.1f} GB per device (+ "
                             f"{RUNTIME_RESERVE_GB:g} GB runtime), more than the {allowed / 1e9:.1f} GB that "
                             f"gpu_memory_utilization={utilization} allows of {device.memory_gb:g} GB")
        act = activation_bytes(model, stage, layout.tp, sched)
        for rank in layout.ranks.stage_ranks(s):
            kv_heads = head_ranges(model, rank % layout.tp, layout.tp)[1][1]
            per_block = kv_bytes_per_block(model, stage.layers, BLOCK_SIZE, kv_heads)
            profiles.append(MemoryProfile(f"rank{rank}", total, stage.weight_bytes + reserve, act, 0, per_block))
    blocks = blocks_per_ve(profiles, utilization, num_ve)
    check_kv_capacity(blocks, BLOCK_SIZE, sched.max_model_len, "use more devices")
    return blocks


def _cpu_blocks_per_ve(model: ModelConfig, device: Device, layout: Layout, stages: list[Stage],
                       sched: SchedulerConfig, num_ve: int) -> int:
    """serve on a CPU: a KV budget of CPU_KV_CACHE_GB per stage, sized by EngineArgs itself; the weights and the
    budget must fit the process's memory."""
    budget = int(CPU_KV_CACHE_GB * (1 << 30))
    for s, stage in enumerate(stages):
        if stage.weight_bytes + budget > device.memory_gb * 1e9:
            raise ValueError(f"stage {s}'s weights take {stage.weight_bytes / 1e9:.1f} GB per process, with "
                             f"{CPU_KV_CACHE_GB:g} GiB of KV more than its {device.memory_gb:g} GB")
    cache = CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=budget)
    blocks = EngineArgs().num_blocks_from_memory(model, cache, max(st.layers for st in stages), layout.tp) // num_ve
    check_kv_capacity(blocks, BLOCK_SIZE, sched.max_model_len, "raise num_kv_blocks / kv_cache_memory_gb")
    return blocks
