"""The engine's command-line flags, declared once for every sub-command that starts an engine (generate,
serve, bench throughput) and for `pipeserve worker` (the cluster flags). Names follow vLLM; each flag maps to
an `EngineArgs` field of the same name."""

from __future__ import annotations

import argparse
from typing import Any

from pipeserve.config import QUANTIZATION_METHODS
from pipeserve.engine.arg_utils import EngineArgs


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Engine flags with vLLM's names; each maps to an EngineArgs field."""
    d = EngineArgs()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF folder, .gguf file, or 'smollm2-135m-instruct' (default)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--quantization", "-q", default=d.quantization, choices=QUANTIZATION_METHODS,
                   help="weight-only quantization. none (default): dense weights; a request gets the same "
                        "tokens alone and in any batch (float32). auto keeps a GGUF's 4-bit blocks 4-bit and "
                        "its LM head int8 (HF checkpoints stay dense); int8/int4 quantize every matmul on load. "
                        "These run the quantized kernels (bfloat16) on steps of up to 4 rows and the dense copy "
                        "on larger ones: faster decode of a few streams, but not batch-invariant")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="running requests per virtual engine (default: 64 on CPU, 256 on CUDA)")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens per step and virtual engine (default: 512 on CPU, 8192 on CUDA; max_model_len "
                        "without chunked prefill)")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=d.enable_chunked_prefill)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                   help="reuse the KV of prompt prefixes computed before (default: on, as in vLLM)")
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--num-kv-blocks", type=int, default=d.num_kv_blocks,
                   help="KV blocks per stage, split among the virtual engines (overrides the memory settings)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb,
                   help="KV pool per stage in GiB (default: 2 on CPU; on CUDA unset: --gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="CUDA: share of each GPU's memory the engine may use, KV pool included; the pool gets "
                        "what weights and a profiled step at the largest batch leave (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker,
                   help="torch threads of each process that runs the model (default: cores / processes)")
    g.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--enforce-eager", action="store_true", default=d.enforce_eager,
                   help="run every decode step eagerly: no CUDA graphs (they are captured at start on CUDA "
                        "stages whose tensor-parallel group is one device)")
    g.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help="most stop strings one request may ask for; each is searched for after every token "
                        f"(default {d.max_stop_strings}; OpenAI allows 4; more is refused with a 400)")
    g.add_argument("--max-stop-string-length", type=int, default=d.max_stop_string_length,
                   help=f"longest stop string a request may ask for, in characters (default "
                        f"{d.max_stop_string_length}; longer is refused with a 400)")
    p = parser.add_argument_group("parallelism")
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=d.pipeline_parallel_size)
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    p.add_argument("--pp-layer-partition", default=d.pp_layer_partition,
                   help="'balanced' (default: by estimated cost at 1k-in/128-out), 'balanced:F' (F = share of "
                        "computed tokens that are sampled; 1 = pure decode), 'even', or layers per stage like 19,11")
    p.add_argument("--num-virtual-engines", type=int, default=d.num_virtual_engines,
                   help="independent schedulers kept in flight (default: the pipeline size)")
    p.add_argument("--max-steps-in-flight-per-ve", type=int, default=d.max_steps_in_flight_per_ve,
                   help="steps one virtual engine may have in the pipeline at once (default: one per stage); "
                        "a long prompt's chunks fill the pipeline up to this")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="plan each decode step before the previous step's tokens reach the host, the sampled ids "
                        "feeding the next step on the device (takes effect at PP=1, TP=1); stop and EOS apply one step "
                        "late, the extra token dropped (default: on for CUDA, off for CPU)")
    add_cluster_flags(p)
    p.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=d.distributed_executor_backend,
                   help="mp (default): pipeserve starts the stage processes (and `pipeserve worker` on other "
                        "machines); ray: one Ray actor per rank on a Ray cluster (pip install 'pipeserve[ray]')")
    p.add_argument("--ray-address", default=d.ray_address,
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one-machine cluster)")
    p.add_argument("--ray-cpus-per-rank", type=float, default=d.ray_cpus_per_rank,
                   help="logical CPUs each rank's Ray actor reserves (default 1)")
    r = parser.add_argument_group("failures")
    r.add_argument("--step-timeout-s", type=float, default=d.step_timeout_s,
                   help="a step without a result this long means a stuck stage, which is replaced (the first steps "
                        "after start-up or a recovery get 5x)")
    r.add_argument("--max-stage-restarts", type=int, default=d.max_stage_restarts,
                   help="recoveries from a failed stage allowed within --restart-window-s; past that the engine "
                        "fails every request and `serve` exits non-zero (0: never recover)")
    r.add_argument("--restart-window-s", type=float, default=d.restart_window_s)
    r.add_argument("--node-rejoin-timeout-s", type=float, default=d.node_rejoin_timeout_s,
                   help="how long a recovery waits for a lost machine's `pipeserve worker` to come back")
    p.add_argument("--trace-file", default=d.trace_file,
                   help="write every stage's step timeline as Chrome-trace JSON, plus a PNG Gantt chart beside it")


def add_cluster_flags(p: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """Rendezvous flags, the same on the head (`--node-rank 0`) and on `pipeserve worker` machines."""
    d = EngineArgs()
    p.add_argument("--nnodes", type=int, default=d.nnodes, help="machines in the cluster (default 1)")
    p.add_argument("--node-rank", type=int, default=d.node_rank, help="this machine's index; the engine is node 0")
    p.add_argument("--master-addr", default=d.master_addr, help="address of node 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=d.master_port,
                   help="rendezvous port on node 0 (the engine also listens on port+1); default: a free one")
    p.add_argument("--join-timeout-s", type=float, default=d.join_timeout_s,
                   help="seconds the engine waits for every rank (and worker machine) to connect")
    p.add_argument("--cluster-key", default=d.cluster_key,
                   help="shared secret authenticating ranks across machines (they exchange pickled messages: "
                        "run only inside one trusted cluster)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed engine flags as LLM(...) keyword arguments."""
    return {k: v for k, v in vars(args).items() if k in EngineArgs.field_names() and k != "model"}
