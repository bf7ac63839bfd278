"""Entry point of a stage process: `python -m pipeserve.worker.main --engine HOST:PORT --rank K`.

The process connects back to the engine (an authenticated multiprocessing connection; the key arrives on
stdin, never on the command line), receives its WorkerSpec, and serves steps until told to stop. Running
as a plain module, not a multiprocessing child, means no script of the user's is re-imported.
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing.connection import Client

from pipeserve.worker.worker import worker_main


def main() -> None:
    parser = argparse.ArgumentParser(description="one pipeserve stage process (started by the engine)")
    parser.add_argument("--engine", required=True, help="HOST:PORT of the engine's listener")
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args()
    host, port = args.engine.rsplit(":", 1)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    conn = Client((host, int(port)), authkey=authkey)
    conn.send(("hello", args.rank))
    kind, spec = conn.recv()
    assert kind == "spec", f"expected the worker spec, got {kind!r}"
    worker_main(spec, conn)


if __name__ == "__main__":
    main()
