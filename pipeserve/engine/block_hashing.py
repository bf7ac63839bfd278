"""Content hashes of full KV blocks, the keys of the prefix cache.

A block's hash covers its own tokens and, through its parent's hash, every token before it, so equal
hashes mean equal prefixes and the KV those tokens produced at those positions is the same. The first
block also takes the request's `cache_salt`: requests with different salts never share blocks, so one
tenant cannot learn through timing whether another sent a prompt (as vLLM's `cache_salt`).

SHA-256 rather than Python's `hash`: a collision would hand one request another's KV, and with a
cryptographic hash it takes no less work to forge one than to break SHA-256.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

_ROOT = b"pipeserve-prefix-v1"


def hash_block(parent: BlockHash | None, tokens: list[int], salt: str | None = None) -> BlockHash:
    """The hash of one full block, chained to the block before it (None for the first block)."""
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    if parent is None and salt:
        h.update(b"salt:" + salt.encode() + b"\x00")
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids_from, num_tokens: int, block_size: int,
                        salt: str | None = None) -> list[BlockHash]:
    """Append to `hashes` the hashes of every full block of the first `num_tokens` tokens not hashed yet.

    `token_ids_from(start, n)` returns tokens [start, start + n) of the sequence (as `Request.token_ids_from`),
    so a long sequence is never copied whole. Returns `hashes`."""
    for i in range(len(hashes), num_tokens // block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids_from(i * block_size, block_size), salt))
    return hashes
