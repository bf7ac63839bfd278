"""A throwaway cluster of "hosts" on one Linux machine: network namespaces joined by veth pairs.

For tests and benchmarks of multi-machine runs. Needs root and iproute2. The hosts sit on a private
subnet that exists only inside the namespaces; `tc ... tbf` can cap a link's rate. Everything is torn
down on exit, also on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"ps-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NetnsCluster:
    """`n` hosts in a star: host 0 (the head) has a veth pair to every other host, all on one /24.

    Host i has address `subnet.(i+1)`. `rate` (e.g. "1gbit") caps every link with a token bucket.
    """

    n: int = 2
    subnet: str = "10.231.7"
    rate: str | None = None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    names: list[str] = field(default_factory=list)

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def __enter__(self) -> NetnsCluster:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.names = [f"ps{self.tag}h{i}" for i in range(self.n)]
        for name in self.names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.names[0], "link", "add", "br0", "type", "bridge")
        _ip("-n", self.names[0], "addr", "add", f"{self.addr(0)}/24", "dev", "br0")
        _ip("-n", self.names[0], "link", "set", "br0", "up")
        for i in range(1, self.n):
            head_end, host_end = f"v{self.tag}a{i}", f"v{self.tag}b{i}"
            _ip("link", "add", head_end, "type", "veth", "peer", "name", host_end)
            _ip("link", "set", head_end, "netns", self.names[0])
            _ip("link", "set", host_end, "netns", self.names[i])
            _ip("-n", self.names[0], "link", "set", head_end, "master", "br0")
            _ip("-n", self.names[0], "link", "set", head_end, "up")
            _ip("-n", self.names[i], "addr", "add", f"{self.addr(i)}/24", "dev", host_end)
            _ip("-n", self.names[i], "link", "set", host_end, "up")
            if self.rate:
                for ns, dev in ((self.names[0], head_end), (self.names[i], host_end)):
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                    "rate", self.rate, "burst", "64kb", "latency", "10ms"], check=True,
                                   capture_output=True)

    def command(self, host: int, argv: list[str], cpus: str | None = None) -> list[str]:
        """argv run inside host's namespace (pinned to `cpus`, e.g. "0", when given)."""
        prefix = ["ip", "netns", "exec", self.names[host]]
        return prefix + (["taskset", "-c", cpus] if cpus is not None else []) + argv

    def close(self) -> None:
        for name in self.names:
            # A namespace outlives its deletion while processes run in it (daemons such as Ray's detach from
            # whoever started them), so whatever still runs there goes first.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            if pids:
                subprocess.run(["kill", "-9", *pids], capture_output=True)
        for name in self.names:  # deleting a namespace removes its veth ends (and their peers) too
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names = []

    def __exit__(self, *exc: object) -> None:
        self.close()
