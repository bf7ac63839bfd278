"""`--distributed-executor-backend ray` across two Ray nodes: a head and a second node, each in its own
network-namespace host (so every activation between stages crosses a real link). PP=2 with one stage per
node, PP=2 x TP=2 with each TP group packed on one node, a killed actor on the far node, and the server over
HTTP on the embedded model: all give the single-process engine's greedy tokens (and HF's, on the tiny
checkpoints)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import assert_greedy_match, hf_greedy

from pipeserve import LLM, SamplingParams
from pipeserve.control.process import free_port
from pipeserve.testing_netns import NetnsCluster, netns_available

pytest.importorskip("ray", reason="Ray is not installed: pip install 'pipeserve[ray]'")
reason = netns_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(reason is not None, reason=reason or "")]

from ray_netns import RayNetnsCluster, start_ray_cluster  # noqa: E402 - after the skips: it needs Ray's CLI

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(3, 40)), [100], list(range(50, 120))]
MAX_TOKENS = 16
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import ray
    from pipeserve import LLM, SamplingParams
    model, address, kwargs, prompts, kill_rank = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model, dtype="float32", max_model_len=256, max_num_batched_tokens=16, threads_per_worker=1,
             distributed_executor_backend="ray", ray_address=address, ray_cpus_per_rank=0.5, **kwargs) as llm:
        launcher = llm.engine.executor.launcher
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        placed = {r: launcher.pid_and_node(r) for r in range(launcher.layout.world_size)}
        run = lambda cb=None: [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], greedy, on_output=cb)]
        tokens, after_kill = run(), None
        if kill_rank is not None:
            def kill(i, out):
                if i == 0 and len(out.outputs[0].token_ids) == 6 and not placed.get("killed"):
                    placed["killed"] = os.kill(placed[kill_rank][0], signal.SIGKILL) or True
            after_kill = run(kill)
        restarts = dict(llm.engine.executor.recoveries.restarts_by_stage)
    print("RESULT " + json.dumps({"tokens": tokens, "after_kill": after_kill, "restarts": restarts,
                                  "node_of_rank": {r: ips[placed[r][1]] for r in range(launcher.layout.world_size)}}))
""").replace("MAX_TOKENS", str(MAX_TOKENS))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NetnsCluster(2, subnet="10.231.8") as netns:
        yield start_ray_cluster(netns, tmp_path_factory.mktemp("ray"))


def drive(cluster: RayNetnsCluster, model: str, kill_rank: int | None = None, **kwargs) -> dict:
    proc = cluster.run_on(0, [sys.executable, "-c", DRIVER, model, cluster.address, json.dumps(kwargs),
                              json.dumps(PROMPTS), json.dumps(kill_rank)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "RESULT " in out, err[-4000:]
    return json.loads(out.split("RESULT ", 1)[1])


def single_process(model: str) -> list[list[int]]:
    with LLM(model, dtype="float32", max_model_len=256) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def assert_matches_hf(hf_model, tokens: list[list[int]]) -> None:
    for prompt, ours in zip(PROMPTS, tokens, strict=True):
        assert_greedy_match(hf_model, prompt, ours, hf_greedy(hf_model, prompt, len(ours)))


def test_pp2_one_stage_per_node_and_a_killed_far_actor(cluster, tiny_models, hf_models):
    result = drive(cluster, tiny_models["gqa"], kill_rank=1, pipeline_parallel_size=2)
    assert sorted(result["node_of_rank"].values()) == [cluster.netns.addr(0), cluster.netns.addr(1)]
    assert result["tokens"] == single_process(tiny_models["gqa"])
    assert_matches_hf(hf_models["gqa"], result["tokens"])
    # The actor of stage 1 died mid-run; pipeserve's recovery placed a new one and recomputed: nothing lost.
    assert result["after_kill"] == result["tokens"] and result["restarts"] == {"1": 1}


def test_pp2_tp2_packs_each_tp_group_on_one_node(cluster, tiny_models, hf_models):
    result = drive(cluster, tiny_models["llama3_rope_tied"], pipeline_parallel_size=2, tensor_parallel_size=2)
    nodes = result["node_of_rank"]
    assert nodes["0"] == nodes["1"] and nodes["2"] == nodes["3"] and nodes["0"] != nodes["2"]
    assert result["tokens"] == single_process(tiny_models["llama3_rope_tied"])
    assert_matches_hf(hf_models["llama3_rope_tied"], result["tokens"])


CLIENT = textwrap.dedent("""
    import json, sys
    from openai import OpenAI
    client = OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0, timeout=120)
    texts = []
    for prompt in json.loads(sys.argv[2]):
        out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=12,
                                        temperature=0)
        texts.append(out.choices[0].text)
    print("RESULT " + json.dumps(texts))
""")


def stage_processes(cluster: RayNetnsCluster, host: int) -> list[str]:
    """The rank actors' processes running in a host's namespace (Ray names them after the actor class)."""
    pids = subprocess.run(["ip", "netns", "pids", cluster.netns.names[host]], capture_output=True, text=True)
    names = []
    for pid in pids.stdout.split():
        try:
            names.append(open(f"/proc/{pid}/comm").read().strip())
        except OSError:
            continue
    return sorted(n for n in names if n.startswith("ray::_RankActor"))


def test_served_over_http_on_the_embedded_model(cluster, tmp_path):
    texts = ["The capital of France is", "Pipeline parallelism splits a model into"]
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    server = cluster.run_on(0, [sys.executable, "-m", "pipeserve.entrypoints.launch", "serve", "--host",
                                cluster.netns.addr(0), "--port", str(port), "-pp", "2", "--dtype", "float32",
                                "--quantization", "none", "--max-model-len", "512", "--threads-per-worker", "1",
                                "--distributed-executor-backend", "ray", "--ray-address", cluster.address,
                                "--ray-cpus-per-rank", "0.5"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://{cluster.netns.addr(0)}:{port}"
        deadline = time.monotonic() + 240
        while subprocess.run(cluster.netns.command(0, ["curl", "-sf", f"{url}/health"]),
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-4000:]
            time.sleep(1)
        client = cluster.run_on(0, [sys.executable, "-c", CLIENT, f"{url}/v1", json.dumps(texts)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = client.communicate(timeout=240)
        assert client.returncode == 0, err[-3000:]
        served = json.loads(out.split("RESULT ", 1)[1])
        # One stage per Ray node: each namespace runs one rank actor.
        assert stage_processes(cluster, 0) == stage_processes(cluster, 1) == ["ray::_RankActor"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    with LLM(dtype="float32", quantization="none", max_model_len=512) as llm:  # the single-process engine
        expected = [o.outputs[0].text for o in llm.generate(texts, SamplingParams(temperature=0, max_tokens=12))]
    assert served == expected
