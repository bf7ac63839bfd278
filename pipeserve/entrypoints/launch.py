"""The `pipeserve` command: start this machine's stage processes first, then import and run the CLI.

Every process of a pipeline needs torch, whose import costs about 1.6 s of CPU. Stage processes are
normally started once the engine has imported everything and read the model's config, and then import it
again. Here torch and the model code are imported once and the stage processes forked from this process
before any thread exists, so they import nothing and wait for their assignment while the engine starts
(launcher.prewarm_ranks).
Only the flags that size the pipeline are read here; the CLI parses and checks everything as usual.
"""

from __future__ import annotations

import argparse
import sys

from pipeserve.distributed.rank_layout import RankLayout  # plain integers: imports no torch

_ENGINE_COMMANDS = ("serve", "generate", "bench")


def local_ranks(argv: list[str]) -> int:
    """Stage processes this command will start on this machine (0 when none, or when not known here)."""
    if not argv or argv[0] not in _ENGINE_COMMANDS:
        return 0
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--distributed-executor-backend", default="mp")
    p.add_argument("-h", "--help", action="store_true")
    try:
        args, _ = p.parse_known_args(argv[1:])
    except SystemExit:  # a malformed flag: let the CLI report it
        return 0
    world = RankLayout(args.pipeline_parallel_size, args.tensor_parallel_size).world_size
    if args.help or args.nnodes != 1 or world < 2 or world > 64 or args.distributed_executor_backend != "mp":
        return 0
    return world


def main() -> None:
    ranks = local_ranks(sys.argv[1:])
    if ranks:
        import pipeserve.worker.rank_process  # noqa: F401 - torch and the model code, shared with forked ranks
        from pipeserve.control.launcher import prewarm_ranks

        prewarm_ranks(ranks)
    from pipeserve.entrypoints.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
