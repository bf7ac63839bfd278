"""A two-node Ray cluster on this machine: the head in one network-namespace host, a second Ray node in
another, joined over their private link, with token authentication on (as docs/distributed.md asks of real clusters).

Each node declares one CPU, so together they claim what this 2-core machine has; tests ask for fractions.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeserve.testing_netns import NetnsCluster

RAY_PORT = 6379  # the GCS port, inside the head's namespace (nothing else listens there)


@dataclass
class RayNetnsCluster:
    netns: NetnsCluster
    env: dict[str, str]  # what every process talking to the cluster needs (the token)

    @property
    def address(self) -> str:
        return f"{self.netns.addr(0)}:{RAY_PORT}"

    def run_on(self, host: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """argv started inside host's namespace with the cluster's environment."""
        return subprocess.Popen(self.netns.command(host, argv), env=self.env, **kwargs)


def ray_executable() -> str:
    import sys

    found = Path(sys.executable).parent / "ray"
    return str(found) if found.exists() else shutil.which("ray") or "ray"


def start_ray_cluster(netns: NetnsCluster, workdir: Path) -> RayNetnsCluster:
    """`ray start --head` on host 0 and `ray start --address` on host 1; stopped with the namespaces (their
    `close` kills whatever runs inside them)."""
    token = workdir / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--disable-usage-stats"]
    head = [ray_executable(), "start", "--head", f"--node-ip-address={netns.addr(0)}", f"--port={RAY_PORT}",
            "--include-dashboard=false", f"--temp-dir={workdir / 'ray-head'}", *common]
    node = [ray_executable(), "start", f"--address={netns.addr(0)}:{RAY_PORT}", f"--node-ip-address={netns.addr(1)}",
            f"--temp-dir={workdir / 'ray-node'}", *common]
    for host, argv in ((0, head), (1, node)):
        done = subprocess.run(netns.command(host, argv), env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` on host {host} failed:\n{done.stderr[-3000:]}")
    return RayNetnsCluster(netns, env)
