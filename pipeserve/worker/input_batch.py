"""The stage's persistent per-request rows: one row per request it holds, edited in place as requests come,
go and grow (in the spirit of vLLM's InputBatch).

Block tables live in one host int32 array, a row per request. A step plan carries only the blocks appended
since a request's last step; they are written into the row where they belong, so a decode step reads every
request's table by row index (one numpy gather), with no per-request list walked or tensor built.
Rows are recycled when requests finish; the array grows (rows or columns) when it must, which only ever
happens between steps, never inside one.
"""

from __future__ import annotations

import numpy as np


class InputBatch:
    """Row allocation and the block-table array of the requests a stage holds."""

    def __init__(self, rows: int = 64, max_blocks: int = 16):
        self.block_tables = np.zeros((rows, max_blocks), dtype=np.int32)  # (rows, max blocks per request)
        self.num_blocks = np.zeros(rows, dtype=np.int32)  # (rows,) filled entries of each row
        self.row_of: dict[str, int] = {}
        self._free = list(range(rows - 1, -1, -1))  # popped from the end: low rows first

    def __len__(self) -> int:
        return len(self.row_of)

    def clear(self) -> None:
        rows = self.block_tables.shape[0]
        self.row_of.clear()
        self.num_blocks[:] = 0
        self._free = list(range(rows - 1, -1, -1))

    def add(self, req_id: str, blocks: list[int]) -> None:
        """A request sent whole: (re)start its row with its whole table."""
        row = self.row_of.get(req_id)
        if row is None:
            if not self._free:
                self._grow_rows()
            row = self.row_of[req_id] = self._free.pop()
        self.num_blocks[row] = 0
        self.append(req_id, blocks)

    def append(self, req_id: str, blocks: list[int]) -> None:
        """Blocks appended to a known request's table since its last step."""
        if not blocks:
            return
        row = self.row_of[req_id]
        start = int(self.num_blocks[row])
        end = start + len(blocks)
        if end > self.block_tables.shape[1]:
            self._grow_columns(end)
        self.block_tables[row, start:end] = blocks
        self.num_blocks[row] = end

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.num_blocks[row] = 0
            self._free.append(row)

    def rows(self, req_ids: list[str]) -> np.ndarray:
        """(n,) row of each request, in the given order."""
        row_of = self.row_of
        return np.fromiter((row_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))

    def _grow_rows(self) -> None:
        old = self.block_tables.shape[0]
        self.block_tables = np.concatenate([self.block_tables, np.zeros_like(self.block_tables)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free = list(range(2 * old - 1, old - 1, -1))

    def _grow_columns(self, needed: int) -> None:
        rows, cols = self.block_tables.shape
        wider = np.zeros((rows, max(needed, 2 * cols)), dtype=np.int32)
        wider[:, :cols] = self.block_tables
        self.block_tables = wider
