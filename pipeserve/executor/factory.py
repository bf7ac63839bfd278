"""Picks the executor for a parallel layout."""

from __future__ import annotations

import logging

from pipeserve.config import EngineConfig
from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.executor.base import Executor

logger = logging.getLogger(__name__)


def create_executor(config: EngineConfig, offload: bool = False) -> Executor:
    """One process for PP=1 x TP=1; one process per (stage, TP rank) otherwise, and always with Ray (whose
    actors run where the cluster has room, not in this process)."""
    par = config.parallel
    layout = RankLayout(par.pipeline_parallel_size, par.tensor_parallel_size)
    if layout.world_size == 1 and par.distributed_executor_backend == "mp":
        from pipeserve.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config, offload=offload)
    from pipeserve.distributed.partition import StageCosts, describe, stages_from_sizes
    from pipeserve.executor.multiproc import MultiprocExecutor

    sizes = list(par.stage_layers)
    logger.info("pipeline partition: %s", describe(sizes, StageCosts.of(config.model)))  # costs at the reference mix
    return MultiprocExecutor(config, stages_from_sizes(sizes))
