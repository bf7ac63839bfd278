"""What the server says when it starts: the model, the parallel layout, KV capacity, the URL, a curl line."""

from __future__ import annotations

import json
import shlex

from pipeserve.config import EngineConfig
from pipeserve.distributed.partition import StageCosts, describe, stages_from_sizes


def describe_layout(config: EngineConfig, model_name: str) -> list[str]:
    """Log lines: which layers run where, how many KV tokens each virtual engine holds, how many requests fit."""
    m, par, sched = config.model, config.parallel, config.scheduler
    ves, max_len = config.num_virtual_engines, sched.max_model_len
    lines = [f"model {model_name!r} ({m.path}): {m.num_hidden_layers} layers, dtype "
             f"{m.dtype}, max_model_len {max_len}, device {par.device}",
             f"parallel layout: PP={par.pipeline_parallel_size} x TP={par.tensor_parallel_size}, {ves} virtual "
             f"engine(s), {par.threads_per_worker} torch thread(s) per model process"]
    sizes = list(par.stage_layers) or [m.num_hidden_layers]
    for st in stages_from_sizes(sizes):
        extras = (["embedding"] if st.is_first else []) + (["final norm", "LM head"] if st.is_last else [])
        lines.append(f"  stage {st.rank}: layers [{st.start_layer}, {st.end_layer}) + {' + '.join(extras)}")
    if len(sizes) > 1:
        lines.append(f"  estimated balance: {describe(sizes, StageCosts.of(m))}")
    tokens = config.tokens_per_ve
    lines.append(f"KV cache: {config.num_blocks_per_ve} blocks x {config.cache.block_size} tokens = {tokens} "
                 f"tokens per virtual engine ({tokens * ves} in all)")
    lines.append(f"max concurrency: {sched.max_num_seqs} running requests per virtual engine "
                 f"({sched.max_num_seqs * ves} in all); KV room for {(tokens // max_len) * ves} requests of the "
                 f"full {max_len} tokens at once")
    return lines


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"


def curl_example(url: str, model_name: str, with_api_key: bool) -> str:
    """A ready-to-paste completion request (the key, if any, comes from $PIPESERVE_API_KEY, never the log)."""
    body = json.dumps({"model": model_name, "prompt": "The capital of France is", "max_tokens": 32,
                       "temperature": 0})
    auth = ' -H "Authorization: Bearer $PIPESERVE_API_KEY"' if with_api_key else ""
    return f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
