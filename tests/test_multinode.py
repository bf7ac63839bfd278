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
    import json, sys
    from pipeserve import LLM, SamplingParams
    kwargs, model, prompts = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    with LLM(model, dtype="float32", max_model_len=256, threads_per_worker=1, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    print("RESULT " + json.dumps([o.outputs[0].token_ids for o in outs]))
""")
PORT = 29611


def run_driver(cluster: NetnsCluster | None, model: str, **kwargs) -> subprocess.Popen:
    argv = [sys.executable, "-c", DRIVER, json.dumps(kwargs), model, json.dumps(PROMPTS)]
    return subprocess.Popen(cluster.command(0, argv) if cluster else argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def worker_cmd(cluster: NetnsCluster, node: int, *extra: str) -> list[str]:
    return cluster.command(node, [sys.executable, "-m", "pipeserve.entrypoints.cli", "worker", "--nnodes",
                                  str(cluster.n), "--node-rank", str(node), "--master-addr", cluster.addr(0),
                                  "--master-port", str(PORT), "--cluster-key", "test-key", *extra])


def result_of(proc: subprocess.Popen, timeout: float = 240) -> list[list[int]]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.split("RESULT ", 1)[1])


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
