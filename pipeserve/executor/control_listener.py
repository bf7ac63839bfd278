"""Where rank processes and node agents reach the engine, for the engine's whole life.

The listener stays open after start-up: replacement ranks and returning node agents connect to it during
recoveries. Its neighbour, the rendezvous store, is hosted here too, so that both outlive any rank.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener

import torch.distributed as dist

from pipeserve.control.messages import NodeHello, RankHello

HELLO_TIMEOUT_S = 10.0  # a connection that does not introduce itself by then is dropped


class ControlListener:
    """Accepts authenticated connections and hands each to `on_rank` or `on_agent` by its first message."""

    def __init__(self, address: tuple[str, int], authkey: bytes, world_size: int,
                 on_rank: Callable[[RankHello, Connection], None], on_agent: Callable[[NodeHello, Connection], None]):
        self._listener = Listener(address, authkey=authkey)
        self.address: tuple[str, int] = self._listener.address
        self.world_size, self.on_rank, self.on_agent = world_size, on_rank, on_agent
        self._closed = False
        threading.Thread(target=self._accept_loop, name="pipeserve-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
                if not conn.poll(HELLO_TIMEOUT_S):
                    conn.close()
                    continue
                hello = conn.recv()
            except (OSError, EOFError, ValueError):
                continue  # a stranger without the key, a dropped attempt, or the listener closing
            if isinstance(hello, RankHello) and 0 <= hello.rank < self.world_size:
                self.on_rank(hello, conn)
            elif isinstance(hello, NodeHello):
                self.on_agent(hello, conn)
            else:
                conn.close()

    def close(self) -> None:
        """Close the listener and wake the accept thread blocked on it (closing alone does not wake accept)."""
        self._closed = True
        with contextlib.suppress(OSError):
            socket.create_connection(self.address, timeout=1).close()
        self._listener.close()


def host_store(addr: str, port: int | None, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store every generation of the process group uses (under its own prefix)."""
    try:
        return dist.TCPStore(addr, port or 0, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - torch raises several types here; the cause is in the text
        raise ValueError(f"cannot host the rendezvous store on {addr}:{port or 0} (--master-port): "
                         f"{str(exc).splitlines()[0]}") from None
