"""`--distributed-executor-backend ray` on a local one-machine Ray cluster: the same tokens as the mp
backend, a killed actor replaced by pipeserve's recovery, nothing left in the cluster after shutdown, and
clear errors for what cannot work."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from helpers import assert_greedy_match, hf_greedy

from pipeserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

# `make test` installs Ray (the test extra pins it); Ray is optional, so a machine without it skips these.
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'pipeserve[ray]'")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 120))]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
RAY_KWARGS = dict(distributed_executor_backend="ray", ray_cpus_per_rank=0.5, threads_per_worker=1,
                  max_model_len=256, max_num_batched_tokens=16)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(namespace="pipeserve", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def generate(llm: LLM, on_output=None) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, on_output=on_output)
    return [o.outputs[0].token_ids for o in outs]


def leftovers(wait_s: float = 15.0) -> tuple[list[str], list[str]]:
    """Named pipeserve actors and placement groups still in the cluster (killing is asynchronous: waits)."""
    from ray.util import list_named_actors
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + wait_s
    while True:
        actors = [a for a in list_named_actors() if a.startswith("pipeserve-")]
        groups = [g["name"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if (not actors and not groups) or time.monotonic() > deadline:
            return actors, groups
        time.sleep(0.2)


def test_ray_backend_matches_hf_and_survives_a_killed_actor(tiny_models, hf_models):
    llm = LLM(tiny_models["gqa"], dtype="float32", pipeline_parallel_size=2, step_timeout_s=10, **RAY_KWARGS)
    try:
        launcher = llm.engine.executor.launcher
        assert type(launcher).__name__ == "RayLauncher" and len(launcher.actors) == 2
        pids = {r: launcher.pid(r) for r in (0, 1)}
        assert os.getpid() not in pids.values()
        got = generate(llm)
        for prompt, ours in zip(PROMPTS, got, strict=True):
            assert_greedy_match(hf_models["gqa"], prompt, ours, hf_greedy(hf_models["gqa"], prompt, len(ours)))

        killed = []

        def kill_stage1(i, out):
            if i == 0 and not killed and len(out.outputs[0].token_ids) >= 6:
                killed.append(os.kill(pids[1], signal.SIGKILL))

        assert generate(llm, kill_stage1) == got  # recovered through a new actor, nothing lost
        assert killed and llm.engine.executor.recoveries.restarts_by_stage[1] >= 1
        assert launcher.pid(1) != pids[1]
    finally:
        llm.shutdown()
    actors, groups = leftovers()
    assert actors == [] and groups == []


def test_placement_the_cluster_cannot_hold_fails_at_once_with_the_numbers(tiny_models):
    """-pp 2 -tp 2 at one CPU per rank needs two bundles of 2 CPUs; the 2-CPU cluster holds one. That is
    known before any wait: the error comes at once (the join timeout is the default 120 s), not after it."""
    with pytest.raises(RuntimeError, match=r"need 2 bundle\(s\) of \{'CPU': 2\.0\}.*2 TP rank\(s\) x "
                                           r"--ray-cpus-per-rank 1\.0.*the cluster has \{'CPU': 2\.0\} on 1 node"
                                           r"\(s\), room for 1 such bundle"):
        LLM(tiny_models["gqa"], dtype="float32", pipeline_parallel_size=2, tensor_parallel_size=2,
            **{**RAY_KWARGS, "ray_cpus_per_rank": 1.0})
    assert leftovers() == ([], [])


def test_placement_that_waits_on_busy_resources_names_them(tiny_models):
    """A placement the cluster could hold, but whose CPUs another job holds now, waits up to the join timeout."""
    from ray.util.placement_group import placement_group, remove_placement_group

    other_job = placement_group([{"CPU": 2.0}])
    ray.get(other_job.ready(), timeout=60)
    try:
        with pytest.raises(RuntimeError, match=r"within 3 s: they need 2 bundle\(s\) of \{'CPU': 0\.5\}.*the "
                                               r"cluster has .*free"):
            LLM(tiny_models["gqa"], dtype="float32", pipeline_parallel_size=2, join_timeout_s=3, **RAY_KWARGS)
    finally:
        remove_placement_group(other_job)
    assert leftovers() == ([], [])


def test_engine_starts_its_own_local_cluster_when_none_is_running(tiny_models):
    """The user's path: no Ray cluster and no ray.init; the engine starts a local one (fresh process)."""
    import json
    import subprocess

    code = ("import json, sys; from pipeserve import LLM, SamplingParams\n"
            "with LLM(sys.argv[1], dtype='float32', pipeline_parallel_size=2, distributed_executor_backend='ray', "
            "ray_cpus_per_rank=0.5, threads_per_worker=1, max_model_len=64) as llm:\n"
            "    out = llm.generate([{'prompt_token_ids': [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4))\n"
            "print('RESULT ' + json.dumps(out[0].outputs[0].token_ids))\n")
    proc = subprocess.run([sys.executable, "-c", code, tiny_models["gqa"]], capture_output=True, text=True,
                          timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    with LLM(tiny_models["gqa"], dtype="float32", max_model_len=64) as llm:  # the in-process engine
        expected = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4))
    assert json.loads(lines[0].removeprefix("RESULT ")) == expected[0].outputs[0].token_ids
