"""The C allocator's settings wherever a stage runs (glibc on Linux): its own process, or the engine's at PP=1.

Why: a stage allocates its per-step tensors (activations, attention workspace, logits) with sizes that change
every step, from a few KiB to tens of MiB. glibc serves a request above its mmap threshold with its own
mapping, returned to the system on free, but it raises that threshold (up to 32 MiB) every time such a
mapping is freed. After the first large step nearly every tensor comes from the heap instead, and a heap
cut up by ever-changing sizes keeps growing: in a soak of the embedded model at PP=2 without this setting
each stage grew by +94, +37, +32 MB per 600 requests after warm-up, and did not stop (docs/benchmarks.md,
"A server that runs for weeks"). Fixing the threshold turns the adjustment off, so tensors of
STAGE_MMAP_THRESHOLD bytes or more always get their own mapping and go back to the system when freed;
smaller ones reuse the heap, whose size the small sizes bound. The price is the page faults of fresh
mappings; it was not measured on its own (the soak and Ray benchmarks ran with it on).

Set in the stage process itself (a `mallopt` call at start), not through MALLOC_MMAP_THRESHOLD_ in the
environment, so it holds however the process started (spawned, forked from a prewarmed process, a Ray actor).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

STAGE_MMAP_THRESHOLD = 64 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None  # musl has no mallopt


def fix_mmap_threshold(nbytes: int = STAGE_MMAP_THRESHOLD) -> int | None:
    """Fix glibc's mmap threshold at `nbytes` for this process; returns it, or None where there is no glibc
    (the setting does not exist there, and neither does the growth it prevents)."""
    libc = _libc()
    if libc is None:
        return None
    if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(nbytes)) != 1:
        return None
    # The trim threshold (free memory kept at the heap's top) was raised along with the mmap threshold by
    # whatever ran before: back to glibc's own ratio of the two.
    libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * nbytes))
    return nbytes


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mapped_chunks() -> int | None:
    """How many allocations glibc currently serves with their own mapping (`mallinfo2().hblks`), or None
    without glibc 2.33+. Tests use it to see which side of the threshold an allocation landed on."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblks)
