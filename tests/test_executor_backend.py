"""`--distributed-executor-backend` choices, flags and errors that need no Ray installed."""

from __future__ import annotations

import sys

import pytest

from pipeserve import LLM

RAY_KWARGS = dict(distributed_executor_backend="ray", ray_cpus_per_rank=0.5, threads_per_worker=1)


def test_ray_backend_flags_that_do_not_apply_are_errors(tiny_models):
    with pytest.raises(ValueError, match="not used with the ray backend"):
        LLM(tiny_models["gqa"], pipeline_parallel_size=2, nnodes=2, master_port=29999, cluster_key="k", **RAY_KWARGS)
    with pytest.raises(ValueError, match="distributed_executor_backend must be"):
        LLM(tiny_models["gqa"], distributed_executor_backend="slurm")


def test_missing_ray_is_a_clear_error(monkeypatch):
    from pipeserve.executor.ray_launcher import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'pipeserve\[ray\]'"):
        import_ray()


def test_cli_flags_reach_the_engine_and_skip_prewarmed_processes():
    from pipeserve.entrypoints.cli import build_parser
    from pipeserve.entrypoints.engine_flags import engine_kwargs
    from pipeserve.entrypoints.launch import local_ranks

    argv = ["serve", "-pp", "2", "--distributed-executor-backend", "ray", "--ray-address", "auto",
            "--ray-cpus-per-rank", "0.5"]
    kwargs = engine_kwargs(build_parser().parse_args(argv))
    assert (kwargs["distributed_executor_backend"], kwargs["ray_address"], kwargs["ray_cpus_per_rank"]) == \
        ("ray", "auto", 0.5)
    assert local_ranks(argv) == 0  # Ray starts the ranks: no stage process is forked here
    assert local_ranks(argv[:3]) == 2


def test_bundles_that_fit_counts_whole_bundles_per_node():
    from pipeserve.executor.ray_launcher import bundles_that_fit

    two_cpus = {"CPU": 2.0, "memory": 1e9}
    assert bundles_that_fit({"CPU": 2.0}, [two_cpus]) == 1  # -pp 2 -tp 2 at 1 CPU per rank on 2 cores: short
    assert bundles_that_fit({"CPU": 1.0}, [two_cpus]) == 2
    assert bundles_that_fit({"CPU": 1.5}, [two_cpus, two_cpus]) == 2  # one per node: halves do not add up
    assert bundles_that_fit({"CPU": 0.3}, [{"CPU": 0.9}]) == 3  # not rounded down by float error
    assert bundles_that_fit({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}]) == 2
