"""Entry point of a stage process: `python -m pipeserve.worker.main --engine HOST:PORT --rank K`.

The process connects back to the engine (an authenticated multiprocessing connection; the key arrives on
stdin, never on the command line), introduces itself, receives its StartStage, and serves steps until told
to stop. Running as a plain module, not a multiprocessing child, means no script of the user's is
re-imported. It dies with whoever started it (the engine or a node agent), and with its connection.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from multiprocessing.connection import Client

from pipeserve.distributed.launcher import die_with_parent


def main() -> None:
    die_with_parent()
    parser = argparse.ArgumentParser(description="one pipeserve stage process (started by the engine)")
    parser.add_argument("--engine", required=True, help="HOST:PORT of the engine's listener")
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    host, port = args.engine.rsplit(":", 1)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    conn = Client((host, int(port)), authkey=authkey)

    from pipeserve.distributed.messages import RankHello
    from pipeserve.worker.rank_process import run_rank  # torch and the model code: imported once connected

    conn.send(RankHello(args.rank, os.getpid(), socket.gethostname()))
    run_rank(conn, args.rank)


if __name__ == "__main__":
    main()
