"""Building an engine: the stages start while the tokenizer loads.

Both take seconds (a GGUF tokenizer is rebuilt from the file's metadata; stage processes import torch and
read their weights), and the stages' part happens in other processes, so doing them side by side shortens
start-up by about the shorter of the two.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeserve.config import EngineConfig
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.engine.kv_sizing import size_kv_cache
from pipeserve.executor.factory import create_executor
from pipeserve.loader.tokenizer import load_tokenizer


def build_async_engine(config: EngineConfig, offload: bool = False) -> AsyncEngine:
    """The engine with its stages started, their KV pools sized (kv_sizing.py) and its tokenizer loaded
    (`offload`: see create_executor). The engine's config is `config` with the block count decided."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeserve-tokenizer")
    tokenizer = pool.submit(load_tokenizer, config.model.path)
    try:
        executor = create_executor(config, offload=offload)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # the stage failure is the error to report, now
        raise
    try:
        config = size_kv_cache(config, executor)
        return AsyncEngine(config, executor, tokenizer.result())
    except BaseException:
        executor.shutdown()
        raise
    finally:
        pool.shutdown(wait=False)
