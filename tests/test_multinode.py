"""Multi-machine runs on a test cluster of network namespaces (root and iproute2 needed; CI has both)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pipeserve.testing_netns import NetnsCluster, netns_available

reason = netns_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(reason is not None, reason=reason or "")]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 120))]
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pipeserve import LLM, SamplingParams
    kwargs, model, prompts = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    kill = json.loads(sys.argv[4])  # {"after": k, "argv": [...]}: SIGKILL matching processes at k tokens

    def matching(words):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")
            except OSError:
                continue
            if all(w in argv for w in words):
                yield int(pid)

    def on_output(i, out):
        if kill and i == 0 and len(out.outputs[0].token_ids) == kill["after"] and not kill.get("done"):
            kill["done"] = [os.kill(pid, signal.SIGKILL) for pid in matching(kill["argv"])]
            assert kill["done"], kill

    with LLM(model, dtype="float32", max_model_len=256, threads_per_worker=1, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), on_output=on_output)
        restarts = dict(llm.engine.executor.recoveries.restarts_by_stage) if kill else {}
    print("RESULT " + json.dumps({"tokens": [o.outputs[0].token_ids for o in outs], "restarts": restarts}))
""")
PORT = 29611


def run_driver(cluster: NetnsCluster | None, model: str, kill: dict | None = None, **kwargs) -> subprocess.Popen:
    argv = [sys.executable, "-c", DRIVER, json.dumps(kwargs), model, json.dumps(PROMPTS), json.dumps(kill or {})]
    return subprocess.Popen(cluster.command(0, argv) if cluster else argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def worker_cmd(cluster: NetnsCluster, node: int, *extra: str) -> list[str]:
    return cluster.command(node, [sys.executable, "-m", "pipeserve.entrypoints.cli", "worker", "--nnodes",
                                  str(cluster.n), "--node-rank", str(node), "--master-addr", cluster.addr(0),
                                  "--master-port", str(PORT), "--cluster-key", "test-key", *extra])


def result_of(proc: subprocess.Popen, timeout: float = 240, restarts: dict | None = None) -> list[list[int]]:
    """The driver's token ids; with `restarts`, also checks the stages it had to restart."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.split("RESULT ", 1)[1])
    if restarts is not None:
        assert result["restarts"] == restarts, err[-3000:]
    return result["tokens"]


def test_one_stage_per_host_matches_single_process(tiny_model):
    single = result_of(run_driver(None, tiny_model))
    with NetnsCluster(2) as cluster:
        head = run_driver(cluster, tiny_model, pipeline_parallel_size=2, nnodes=2, master_addr=cluster.addr(0),
                          master_port=PORT, cluster_key="test-key")
        worker = subprocess.Popen(worker_cmd(cluster, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert result_of(head) == single
            assert worker.wait(timeout=60) == 0  # the head's shutdown ends the worker machine's ranks
        finally:
            worker.kill()


def cluster_kwargs(cluster: NetnsCluster, **extra) -> dict:
    return dict(pipeline_parallel_size=2, nnodes=2, master_addr=cluster.addr(0), master_port=PORT,
                cluster_key="test-key", **extra)


def test_ranks_killed_on_the_worker_host_are_restarted_by_its_agent(tiny_model):
    single = result_of(run_driver(None, tiny_model))
    with NetnsCluster(2) as cluster:
        kill = {"after": 6, "argv": ["pipeserve.worker.main", "--rank", "1"]}
        head = run_driver(cluster, tiny_model, kill, **cluster_kwargs(cluster))
        worker = subprocess.Popen(worker_cmd(cluster, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert result_of(head, restarts={"1": 1}) == single
            out, _ = worker.communicate(timeout=60)
            assert worker.returncode == 0
            assert out.count("started ranks [1]") == 2  # at start-up, and the replacement
        finally:
            worker.kill()


def test_killed_worker_agent_is_replaced_within_the_rejoin_timeout(tiny_model):
    """The agent dies (its ranks with it); a new `pipeserve worker` on that host lets the run finish."""
    single = result_of(run_driver(None, tiny_model))
    with NetnsCluster(2) as cluster:
        kill = {"after": 6, "argv": ["pipeserve.entrypoints.cli", "worker"]}
        head = run_driver(cluster, tiny_model, kill, **cluster_kwargs(cluster, node_rejoin_timeout_s=60))
        first = subprocess.Popen(worker_cmd(cluster, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second = None
        try:
            first.wait(timeout=120)  # killed by the driver mid-run
            assert first.returncode == -9
            second = subprocess.Popen(worker_cmd(cluster, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            assert result_of(head, restarts={"1": 1}) == single
            assert second.wait(timeout=60) == 0
        finally:
            for proc in (first, second):
                if proc is not None:
                    proc.kill()


def test_worker_reconnects_to_a_restarted_head(tiny_model):
    """A supervisor restarts a head that was killed: the machine's `pipeserve worker` serves the new one."""
    single = result_of(run_driver(None, tiny_model))
    with NetnsCluster(2) as cluster:
        worker = subprocess.Popen(worker_cmd(cluster, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            first = run_driver(cluster, tiny_model, **cluster_kwargs(cluster))
            assert "started ranks [1]" in worker.stdout.readline() + worker.stdout.readline()
            first.kill()
            first.communicate()
            second = run_driver(cluster, tiny_model, **cluster_kwargs(cluster))
            assert result_of(second) == single
            out, _ = worker.communicate(timeout=60)
            assert worker.returncode == 0, out
            assert "the head went away" in out
        finally:
            worker.kill()


def test_worker_that_cannot_reach_the_head_fails_clearly():
    with NetnsCluster(2) as cluster:  # nobody listens on the head host
        done = subprocess.run(worker_cmd(cluster, 1, "--connect-timeout", "3"), capture_output=True, text=True,
                              timeout=60)
    assert done.returncode != 0
    assert f"could not reach the head at {cluster.addr(0)}:{PORT + 1} within 3 s" in done.stderr


def test_head_reports_ranks_that_never_joined(tiny_model):
    with NetnsCluster(2) as cluster:
        head = run_driver(cluster, tiny_model, pipeline_parallel_size=2, nnodes=2, master_addr=cluster.addr(0),
                          master_port=PORT, cluster_key="test-key", join_timeout_s=5)
        _, err = head.communicate(timeout=120)
    assert head.returncode != 0
    assert "ranks [1] (node 1) did not join within 5 s" in err
