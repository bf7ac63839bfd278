"""Process and network helpers shared by every control process: the engine, a node agent, a rank.

A rank process calls them before it imports torch (`worker/main.py`), so this module imports nothing of
pipeserve and nothing heavy.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import sys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux), and exit now if
    that already happened: a child must never outlive the engine or node agent that owns it."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request above took effect
        os._exit(1)


def name_process(name: str) -> None:
    """Set this process's name as `ps` and /proc/PID/comm show it (Linux; at most 15 bytes kept), so a
    stage process is recognizable whether it was spawned or forked from the `pipeserve` command."""
    if sys.platform != "linux":
        return
    pr_set_name = 15
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
