"""Which slice of the model a pipeline stage owns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    """Stage `rank` of `size` owns decoder layers [start_layer, end_layer)."""

    rank: int
    size: int
    start_layer: int
    end_layer: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def owns_layer(self, index: int) -> bool:
        return self.start_layer <= index < self.end_layer

    @staticmethod
    def whole_model(num_layers: int) -> StageInfo:
        return StageInfo(rank=0, size=1, start_layer=0, end_layer=num_layers)
