"""Hands out fixed-size KV blocks of one virtual engine's pool and keeps each request's block table."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """A free list of physical blocks; a request holds ceil(tokens / block_size) of them, in order."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"a virtual engine needs at least one KV block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, req_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens`; False (and no change) if the pool is short."""
        table = self.block_tables.setdefault(req_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > len(self._free):
            return False
        table.extend(self._free.popleft() for _ in range(max(extra, 0)))
        return True

    def free(self, req_id: str) -> None:
        """Return all of the request's blocks to the pool (no-op if it holds none)."""
        self._free.extend(self.block_tables.pop(req_id, []))
