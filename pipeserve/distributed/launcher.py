"""Starting stage processes, on the head machine and on worker machines (`pipeserve worker`).

Every rank is a `python -m pipeserve.worker.main` process that connects to the engine's control
listener (an authenticated multiprocessing connection; the key travels on stdin). On the head the engine
starts its node's ranks itself. On another machine a node agent (`pipeserve worker --node-rank K`)
connects first, asks the engine which ranks it hosts, starts them, and waits for them.

Ranks are placed by "TP inside a node, PP across nodes": node k hosts ranks [k*W/N, (k+1)*W/N), and
since TP groups are consecutive ranks, a TP group never spans machines when T divides W/N.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Client, Connection


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def control_address(master_addr: str, master_port: int | None, nnodes: int) -> tuple[str, int]:
    """Where the engine listens for ranks: any free loopback port alone, master_port + 1 across machines."""
    if nnodes == 1:
        return "127.0.0.1", 0
    return master_addr, master_port + 1


def ranks_of_node(node_rank: int, world_size: int, nnodes: int) -> list[int]:
    per_node = world_size // nnodes
    return list(range(node_rank * per_node, (node_rank + 1) * per_node))


def spawn_rank(engine: tuple[str, int], rank: int, authkey: bytes, master_addr: str) -> subprocess.Popen:
    """Start one stage process that will connect to the engine at `engine`."""
    env = dict(os.environ)
    iface = interface_towards(master_addr)
    if iface:  # gloo binds to the hostname's address unless told which interface reaches the other hosts
        env["GLOO_SOCKET_IFNAME"] = iface
    proc = subprocess.Popen([sys.executable, "-m", "pipeserve.worker.main", "--engine", f"{engine[0]}:{engine[1]}",
                             "--rank", str(rank)], stdin=subprocess.PIPE, env=env)
    proc.stdin.write(authkey.hex().encode() + b"\n")
    proc.stdin.close()
    return proc


def interface_towards(addr: str) -> str | None:
    """The network interface whose route reaches `addr` (None for loopback or when unknown)."""
    try:
        target = ipaddress.IPv4Address(socket.gethostbyname(addr))
    except (OSError, ValueError):
        return None
    if target.is_loopback:
        return None
    best: tuple[int, str] | None = None
    try:
        with open("/proc/net/route") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for iface, dest, _gw, _flags, _ref, _use, _metric, mask, *_ in rows:
        dest_ip = ipaddress.IPv4Address(int(dest, 16).to_bytes(4, "little"))
        mask_ip = ipaddress.IPv4Address(int(mask, 16).to_bytes(4, "little"))
        net = ipaddress.IPv4Network(f"{dest_ip}/{mask_ip}", strict=False)
        if target in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, iface)
    return best[1] if best else None


def connect_to_head(address: tuple[str, int], authkey: bytes, timeout_s: float) -> Connection:
    """Connect to the engine's control listener, retrying until `timeout_s`; a clear error after that."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, OSError) as exc:
            last_error = exc
            time.sleep(0.5)
    raise ConnectionError(f"could not reach the head at {address[0]}:{address[1]} within {timeout_s:.0f} s "
                          f"({last_error}); is `pipeserve ... --nnodes N --node-rank 0` running there, and is the "
                          f"address reachable from this machine?")


def run_node_agent(master_addr: str, master_port: int, node_rank: int, cluster_key: str,
                   timeout_s: float = 60.0) -> int:
    """`pipeserve worker`: start this machine's ranks of the head's engine and wait for them."""
    address = control_address(master_addr, master_port, nnodes=2)
    authkey = cluster_key.encode()
    conn = connect_to_head(address, authkey, timeout_s)
    conn.send(("node", node_rank))
    kind, ranks = conn.recv()
    conn.close()
    if kind != "ranks":
        raise RuntimeError(f"the head answered {kind!r}: {ranks}")
    print(f"pipeserve worker: node {node_rank} runs ranks {ranks}", flush=True)
    procs = [spawn_rank(address, r, authkey, master_addr) for r in ranks]
    codes = [p.wait() for p in procs]
    return max(codes, default=0)
