"""Ranks as Ray actors (`--distributed-executor-backend ray`), for clusters Ray already manages.

Ray places, starts and watches the rank processes; everything else is the multiprocessing backend's: each
actor runs the same stage code (`pipeserve.worker.main.serve`), connects back to the engine's control
listener, and exchanges activations with its peers over torch.distributed. So no step ever goes through Ray:
the step path costs no Ray call.

Placement: one placement-group bundle per pipeline stage holding that stage's TP ranks, so a TP group is
packed on one node (its all-reduces stay on fast links), and the bundles spread across nodes where the
cluster has several (pipeline hand-offs cross the slow links). A placement the cluster's nodes could not
hold even if they were empty fails at once, naming the numbers (the nodes of an autoscaling cluster must be
up first); one they could hold must be ready within the join timeout (its resources may be busy), else the
error names what was asked and what the cluster has.

Failures: actors are created with Ray's own restarts off (`max_restarts=0`), so Ray never restarts a rank
behind the engine's back; pipeserve's recovery replaces it (a new actor in the same bundle). A dead actor
shows up twice: its control connection closes, and the ObjectRef of its `serve` call fails, which gives
the cause (`exit_code`). A stuck actor is caught by the step deadline, which Ray cannot see.

Nothing is left behind: the placement group and actors are named after the engine (`PG_PREFIX`), removed
at shutdown, and an engine that starts removes whatever a dead engine of the same name left.
"""

from __future__ import annotations

import contextlib
import logging
import os
from multiprocessing.connection import Connection
from typing import Any

from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.executor.rank_launcher import RankLauncher

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "pipeserve"
PG_PREFIX = "pipeserve"
EXIT_KILLED = -9  # what `exit_code` reports for an actor that died (Ray does not say how it ended)


def import_ray() -> Any:
    """Ray, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--distributed-executor-backend ray needs Ray, which is not installed: "
                           "pip install 'pipeserve[ray]'") from None
    return ray


def _normal_priority() -> None:
    """Run this thread (the stage's, and the threads it starts: gloo's) at normal priority, if allowed.

    Ray starts its workers at niceness 15 so that its own daemons come first. A stage is the job's main
    work, and on a node whose cores the stages keep busy every daemon and the engine would preempt it: the
    measured cost was about 2% of throughput at PP=2 on 2 cores. Raising priority needs CAP_SYS_NICE (or
    RLIMIT_NICE); without it the stage keeps Ray's niceness."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # on Linux, 0 means the calling thread


class _RankActor:
    """One rank: runs the stage code until the engine stops it (or its connection goes)."""

    def serve(self, engine: str, rank: int, key: str) -> int:
        from pipeserve.control.process import interface_towards
        from pipeserve.worker.main import serve

        # As for the mp backend's spawned ranks: gloo binds to the hostname's address unless told which
        # interface reaches the engine's machine, and on a multi-homed node that address may be unreachable.
        iface = interface_towards(engine.rsplit(":", 1)[0])
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
        _normal_priority()
        serve(engine, rank, key)
        return 0

    def pid_and_node(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()


def connect_ray(ray_address: str | None, master_addr: str) -> str:
    """Join the Ray cluster (`ray_address`, else $RAY_ADDRESS, else a local one-machine cluster, as vLLM
    does); returns the address the ranks reach this engine at: `master_addr` when one was set, loopback on a
    one-machine cluster, else this node's IP as Ray sees it."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS"), namespace=RAY_NAMESPACE, log_to_driver=False,
                 include_dashboard=False)
    if master_addr != "127.0.0.1":
        return master_addr  # the user's override (vLLM's VLLM_HOST_IP plays this part)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "127.0.0.1" if len(alive) <= 1 else ray.util.get_node_ip_address()


def bundles_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many copies of `bundle` the nodes hold at most, each copy whole on one node. The copies are
    alike, so a node holds as many as its scarcest resource allows."""
    wanted = {k: v for k, v in bundle.items() if v > 0}
    # Ray counts resources in units of 1e-4: the epsilon keeps 0.9 / 0.3 from rounding down to 2.
    return sum(min(int(node.get(k, 0.0) / v + 1e-9) for k, v in wanted.items()) for node in nodes)


class RayLauncher(RankLauncher):
    """Starts each rank as a Ray actor in the engine's placement group (Ray joined by `connect_ray`)."""

    def __init__(self, engine_address: tuple[str, int], authkey: bytes, layout: RankLayout, *,
                 cpus_per_rank: float, gpus_per_rank: float, ready_timeout_s: float, name: str):
        self.ray = import_ray()
        self.engine_address, self.authkey, self.layout, self.name = engine_address, authkey, layout, name
        self.cpus_per_rank, self.gpus_per_rank = cpus_per_rank, gpus_per_rank
        self.remove_leftovers(name)
        # Two threads: `serve` blocks for the rank's life, and `pid_and_node` must still answer meanwhile.
        self._actor_cls = self.ray.remote(max_concurrency=2)(_RankActor)
        self.actors: dict[int, Any] = {}
        self.runs: dict[int, Any] = {}  # rank -> ObjectRef of its `serve` call
        self.pg = self._placement_group(ready_timeout_s)

    def _bundle(self) -> dict[str, float]:
        """One pipeline stage: its TP ranks together, so their all-reduces stay on one node."""
        bundle = {"CPU": self.cpus_per_rank * self.layout.tp_size}
        if self.gpus_per_rank:
            bundle["GPU"] = self.gpus_per_rank * self.layout.tp_size
        return bundle

    def _check_fits(self, bundle: dict[str, float]) -> None:
        """Fail at once when the cluster's nodes, even empty, cannot hold one bundle per stage: Ray would
        wait for resources that never come."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        stages, room = self.layout.pp_size, bundles_that_fit(bundle, nodes)
        if room < stages:
            has = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
            raise RuntimeError(
                f"Ray cannot place the ranks: they need {stages} bundle(s) of {bundle} (one per pipeline stage, "
                f"each on one node: {self.layout.tp_size} TP rank(s) x --ray-cpus-per-rank {self.cpus_per_rank}"
                f"{' and 1 GPU' if self.gpus_per_rank else ''}); the cluster has {has} on {len(nodes)} node(s), "
                f"room for {room} such bundle(s). Lower --ray-cpus-per-rank or give the cluster more nodes")

    def _placement_group(self, timeout_s: float) -> Any:
        from ray.util.placement_group import placement_group

        bundle, stages = self._bundle(), self.layout.pp_size
        self._check_fits(bundle)
        pg = placement_group([dict(bundle) for _ in range(stages)], strategy="SPREAD", name=f"{self.name}-pg")
        try:
            self.ray.get(pg.ready(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - Ray's timeout error type moved between versions
            self.ray.util.remove_placement_group(pg)
            raise RuntimeError(
                f"Ray could not place the ranks within {timeout_s:.0f} s: they need {stages} bundle(s) of {bundle} "
                f"(one per pipeline stage, each on one node); the cluster has {self.ray.cluster_resources()} "
                f"({self.ray.available_resources()} free)") from None
        return pg

    def remove_leftovers(self, name: str) -> None:
        """Remove actors and the placement group a dead engine named `name` left in the cluster."""
        from ray.util import list_named_actors
        from ray.util.placement_group import placement_group_table

        for actor_name in list_named_actors():
            if actor_name.startswith(f"{name}-rank"):
                with contextlib.suppress(Exception):  # gone meanwhile
                    self.ray.kill(self.ray.get_actor(actor_name), no_restart=True)
        for pg_id, info in placement_group_table().items():
            if info.get("name") == f"{name}-pg" and info.get("state") != "REMOVED":
                with contextlib.suppress(Exception):
                    self.ray.util.remove_placement_group(self.ray.util.get_placement_group(info["name"]))
                logger.warning("removed placement group %s left by an earlier engine (%s)", info["name"], pg_id)

    def start(self, ranks: list[int], generation: int, deadline: float) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        engine = f"{self.engine_address[0]}:{self.engine_address[1]}"
        for r in ranks:
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.layout.stage_of(r))
            actor = self._actor_cls.options(name=f"{self.name}-rank{r}-g{generation}", max_restarts=0,
                                            num_cpus=self.cpus_per_rank, num_gpus=self.gpus_per_rank,
                                            scheduling_strategy=strategy).remote()
            self.actors[r] = actor
            self.runs[r] = actor.serve.remote(engine, r, self.authkey.hex())

    def kill(self, ranks: list[int], generation: int) -> None:
        for r in ranks:
            actor = self.actors.get(r)
            if actor is not None:
                with contextlib.suppress(Exception):  # already dead
                    self.ray.kill(actor, no_restart=True)

    def exit_code(self, rank: int, wait_s: float = 0.0) -> int | None:
        run = self.runs.get(rank)
        if run is None:
            return None
        ready, _ = self.ray.wait([run], timeout=wait_s)
        if not ready:
            return None
        try:
            return int(self.ray.get(run))
        except self.ray.exceptions.RayActorError:  # the actor process died (killed, crashed, its node lost)
            return EXIT_KILLED
        except Exception:  # noqa: BLE001 - the stage code raised: its own report names the cause
            return 1

    def pid(self, rank: int) -> int | None:
        if rank not in self.actors or self.exit_code(rank) is not None:
            return None
        try:
            return self.pid_and_node(rank)[0]
        except self.ray.exceptions.RayActorError:  # died just now
            return None

    def pid_and_node(self, rank: int, timeout_s: float = 10.0) -> tuple[int, str]:
        """A rank's process id and the id of the Ray node it runs on (where the placement put it)."""
        return tuple(self.ray.get(self.actors[rank].pid_and_node.remote(), timeout=timeout_s))

    def where(self, rank: int) -> str:
        return f"Ray actor {self.name}-rank{rank}"

    def not_joined(self, ranks: list[int], waited_s: float) -> str:
        host, port = self.engine_address
        return (f"ranks {ranks} (Ray actors) did not join within {waited_s:.0f} s: they connect to the engine at "
                f"{host}:{port}; if the Ray nodes cannot reach that address, set --master-addr to one they can")

    # ---- node agents: none, Ray runs the other machines -------------------------------------------------

    def agent_connected(self, node: int, conn: Connection, host: str) -> None:
        logger.warning("a `pipeserve worker` (node %d, %s) connected, but the ray backend uses no node agents",
                       node, host)
        conn.close()

    def agent_lost(self, node: int, conn: Connection) -> None:
        pass  # never connected: agent_connected closed it

    def agent_connections(self) -> dict[int, Connection]:
        return {}

    def close(self, grace_s: float = 10.0) -> None:
        """Wait up to `grace_s` for the ranks to finish serving, then kill every actor and remove the group."""
        pending = list(self.runs.values())
        if pending:
            with contextlib.suppress(Exception):
                self.ray.wait(pending, num_returns=len(pending), timeout=grace_s)
        self.kill(list(self.actors), -1)
        with contextlib.suppress(Exception):
            self.ray.util.remove_placement_group(self.pg)
