"""Hands out fixed-size KV blocks of one virtual engine's pool, keeps each request's block table, and (with
prefix caching) remembers which full blocks hold which prefix so that later requests reuse their KV.

Automatic prefix caching, as vLLM's: a full block whose tokens have been computed is registered under the
hash of its tokens and everything before them (`block_hashing.py`). A new request takes the longest run of
registered blocks matching its own hashes, adding a reference to each, and computes only the rest. Blocks
are reference-counted; a block no request references goes back to the free list but keeps its KV and its
hash, and is evicted (its hash dropped) only when the block is handed out again. The free list is in
eviction order: blocks that cache nothing are reused first, then cached ones least recently freed first;
a request's blocks are freed tail first, because a sequence's tail is the part least likely shared.

Every stage keeps a pool of the same shape per virtual engine and writes a block only where the engine's
tables say, so the engine's view of which block holds what is true on every stage.
"""

from __future__ import annotations

from collections import OrderedDict

from pipeserve.engine.block_hashing import BlockHash


class BlockManager:
    """A free list of physical blocks; a request holds ceil(tokens / block_size) of them, in order."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"a virtual engine needs at least one KV block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # in eviction order
        self._refs = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}  # hash -> the block holding that prefix's KV
        self._num_evictable = 0  # free blocks that still hold a cached prefix
        self._registered: dict[str, int] = {}  # request -> how many of its leading blocks are registered
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by requests (zero when the engine is idle, cached or not)."""
        return self.num_blocks - len(self._free)

    @property
    def num_evictable_cached_blocks(self) -> int:
        """Free blocks whose KV is cached for reuse; taken only when no other block is free."""
        return self._num_evictable

    def allocate(self, req_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens`; False (and no change) if the pool is short."""
        table = self.block_tables.setdefault(req_id, [])
        extra = -(-num_tokens // self.block_size) - len(table)
        if extra <= 0:
            return True
        if extra > len(self._free):
            return False
        for _ in range(extra):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._refs[block] = 1
            table.append(block)
        return True

    def free(self, req_id: str) -> None:
        """Drop the request's references to its blocks (no-op if it holds none); unreferenced blocks return
        to the pool, keeping any cached prefix until they are handed out again."""
        self._registered.pop(req_id, None)
        for block in reversed(self.block_tables.pop(req_id, ())):
            self._refs[block] -= 1
            if self._refs[block]:
                continue  # another request still reads this prefix
            self._free[block] = None
            if self._hash_of[block] is None:
                self._free.move_to_end(block, last=False)  # caches nothing: hand it out first
            else:
                self._num_evictable += 1

    # ---- prefix caching ------------------------------------------------------------------------------

    def longest_cached_prefix(self, hashes: list[BlockHash], max_tokens: int) -> int:
        """How many leading tokens (whole blocks, at most `max_tokens`) are cached; takes nothing."""
        n = 0
        for h in hashes[: max_tokens // self.block_size]:
            if h not in self._cached:
                break
            n += 1
        return n * self.block_size

    def take_cached_prefix(self, req_id: str, hashes: list[BlockHash], max_tokens: int) -> int:
        """Start the (blockless) request's table with the cached blocks of its longest cached prefix of at
        most `max_tokens` tokens; returns how many tokens that covers (their KV needs no computing)."""
        assert not self.block_tables.get(req_id), "a request takes cached blocks before any other"
        table = []
        for h in hashes[: max_tokens // self.block_size]:
            block = self._cached.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
                self._num_evictable -= 1
            self._refs[block] += 1
            table.append(block)
        self.block_tables[req_id] = table
        self._registered[req_id] = len(table)
        return len(table) * self.block_size

    def cache_full_blocks(self, req_id: str, hashes: list[BlockHash]) -> None:
        """Register the request's blocks under `hashes` (one per leading full block, all computed). A prefix
        another block already holds stays with that block; this one is then simply not cached."""
        table = self.block_tables[req_id]
        for i in range(self._registered.get(req_id, 0), len(hashes)):
            block, h = table[i], hashes[i]
            if h not in self._cached and self._hash_of[block] is None:
                self._cached[h], self._hash_of[block] = block, h
        self._registered[req_id] = len(hashes)

    def bookkeeping(self) -> dict[str, int]:
        """Entries held per request (zero once every request has ended: see AsyncEngine.bookkeeping)."""
        return {"block_tables": len(self.block_tables), "registered_prefixes": len(self._registered)}

    def num_registered_blocks(self, req_id: str) -> int:
        return self._registered.get(req_id, 0)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (a replaced stage lost its KV). Tables stay; requests register their
        blocks again as they recompute them."""
        for block in self._cached.values():
            self._hash_of[block] = None
        self._cached.clear()
        self._num_evictable = 0
        for req_id in self._registered:
            self._registered[req_id] = 0

    def _evict(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            self._hash_of[block] = None
            del self._cached[h]
            self._num_evictable -= 1
