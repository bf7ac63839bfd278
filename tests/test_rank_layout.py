"""Rank arithmetic of the P x T grid: TP-major ranks, pipeline peers T apart, machines by consecutive runs."""

from __future__ import annotations

from pipeserve.distributed.rank_layout import RankLayout


def test_tp_major_grid_of_two_stages_by_two():
    layout = RankLayout(pp_size=2, tp_size=2)
    assert layout.world_size == 4
    assert [layout.stage_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.tp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert (layout.stage_ranks(0), layout.stage_ranks(1)) == ([0, 1], [2, 3])
    assert [layout.prev_peer(r) for r in range(4)] == [None, None, 0, 1]
    assert [layout.next_peer(r) for r in range(4)] == [2, 3, None, None]


def test_pipeline_without_tp_chains_consecutive_ranks():
    layout = RankLayout(pp_size=3, tp_size=1)
    assert [(layout.prev_peer(r), layout.next_peer(r)) for r in range(3)] == [(None, 1), (0, 2), (1, None)]


def test_machines_host_consecutive_runs_of_ranks():
    layout = RankLayout(pp_size=4, tp_size=2, nnodes=2)
    assert layout.ranks_per_node == 4
    assert [layout.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert RankLayout(pp_size=3, tp_size=1, nnodes=2).ranks_per_node == 2  # rounded up
