"""Entry point of a stage process: `python -m pipeserve.worker.main --engine HOST:PORT --rank K`.

With `--await-assignment` (a prewarmed process, see launcher.prewarm_ranks) it imports torch and the model
code first, then reads "HOST:PORT RANK KEY" from stdin.

The process connects back to the engine (an authenticated multiprocessing connection; the key arrives on
stdin, never on the command line), introduces itself, receives its StartStage, and serves steps until told
to stop. Running as a plain module, not a multiprocessing child, means no script of the user's is
re-imported. It dies with whoever started it (the engine or a node agent), and with its connection.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from multiprocessing.connection import Client
from typing import TextIO

from pipeserve.control.process import die_with_parent, name_process


def main() -> None:
    parser = argparse.ArgumentParser(description="one pipeserve stage process (started by the engine)")
    parser.add_argument("--engine", help="HOST:PORT of the engine's listener")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--await-assignment", action="store_true",
                        help="import everything, then read 'HOST:PORT RANK KEY' from stdin")
    args = parser.parse_args()
    ignore_interrupts()
    if args.await_assignment:
        serve_assignment(sys.stdin)
        return
    if args.engine is None or args.rank is None:
        parser.error("--engine and --rank are required")
    die_with_parent()
    serve(args.engine, args.rank, sys.stdin.readline().strip())


def ignore_interrupts() -> None:
    """The engine stops its stages (Stop, or its connection closing). A SIGINT of their own, from a Ctrl-C
    that reaches the whole process group or a `pkill -INT` that matches them too, would end a stage before
    the engine begins its shutdown, and the engine would take that for a failure and replace it. Called on
    a stage process's main thread (a Ray actor runs `serve` on a thread of Ray's, and keeps Ray's handling)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def serve_assignment(source: TextIO) -> None:
    """A prewarmed stage process: import torch and the model code first (the slow part, done while the
    engine starts), then take 'HOST:PORT RANK KEY' from `source` and serve. Nothing arrives when the engine
    did not need this process: then it just ends."""
    die_with_parent()
    ignore_interrupts()  # (again: a rank forked from the `pipeserve` command starts here)
    import pipeserve.worker.rank_process  # noqa: F401

    assignment = source.readline().split()
    if len(assignment) == 3:
        engine, rank, key = assignment
        serve(engine, int(rank), key)


def serve(engine: str, rank: int, key: str) -> None:
    name_process(f"pipeserve-r{rank}")  # what `ps` and the tests look for, however the process started
    host, port = engine.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(key))

    from pipeserve.control.messages import RankHello
    from pipeserve.worker.rank_process import run_rank  # torch and the model code: imported once connected

    conn.send(RankHello(rank, os.getpid(), socket.gethostname()))
    run_rank(conn, rank)


if __name__ == "__main__":
    main()
