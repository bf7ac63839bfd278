"""Rank arithmetic of the P x T grid, and where each rank runs. Plain integers: no torch.

Ranks are laid out TP-major: TP groups are consecutive ranks (they share a machine: fast links), pipeline
peers are T apart (they may sit on different machines: slow links). With T=2, P=2: TP groups [0,1] and
[2,3], pipeline chains [0,2] and [1,3]. Machines take consecutive runs of ranks ("TP inside a node, PP
across nodes"): node k hosts ranks [k*W/N, (k+1)*W/N), so a TP group never spans machines when T divides W/N.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankLayout:
    """Which stage, TP rank and machine each rank of a pipeline of `pp_size` stages x `tp_size` ranks has."""

    pp_size: int
    tp_size: int
    nnodes: int = 1

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size

    def stage_of(self, rank: int) -> int:
        return rank // self.tp_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def stage_ranks(self, stage: int) -> list[int]:
        """The ranks of one stage: its TP group, TP rank 0 first."""
        return [stage * self.tp_size + t for t in range(self.tp_size)]

    def prev_peer(self, rank: int) -> int | None:
        """The rank of the previous stage with this rank's TP rank (None on the first stage)."""
        return None if self.stage_of(rank) == 0 else rank - self.tp_size

    def next_peer(self, rank: int) -> int | None:
        """The rank of the next stage with this rank's TP rank (None on the last stage)."""
        return None if self.stage_of(rank) == self.pp_size - 1 else rank + self.tp_size

    @property
    def ranks_per_node(self) -> int:
        return -(-self.world_size // self.nnodes)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node
