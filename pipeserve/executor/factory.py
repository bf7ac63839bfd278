"""Picks the executor for a parallel layout."""

from __future__ import annotations

from pipeserve.config import EngineConfig
from pipeserve.executor.base import Executor


def create_executor(config: EngineConfig, offload: bool = False) -> Executor:
    """One process for PP=1; one process per stage otherwise."""
    from pipeserve.executor.uniproc import UniProcExecutor

    return UniProcExecutor(config, offload=offload)
