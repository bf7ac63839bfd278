"""The stage processes' allocator setting (pipeserve/worker/allocator.py) takes effect: after a large
tensor is freed, a mid-size one still gets its own mapping (returned to the system when freed) instead of
coming from a heap that grows with ever-changing step sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeserve.worker.allocator import STAGE_MMAP_THRESHOLD, mapped_chunks

pytestmark = pytest.mark.skipif(mapped_chunks() is None, reason="needs glibc 2.33+ (mallinfo2)")

PROBE = """
import sys, torch
from pipeserve.worker.allocator import fix_mmap_threshold, mapped_chunks
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold() == int(sys.argv[2])
big = torch.empty(8 << 20, dtype=torch.uint8)
del big  # freeing a big mapping raises glibc's dynamic threshold
before = mapped_chunks()
mid = torch.empty(512 << 10, dtype=torch.uint8)  # a mid-size step tensor
print(mapped_chunks() - before)
"""


def mapped_after_a_big_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(STAGE_MMAP_THRESHOLD)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_fixed_threshold_keeps_mid_size_tensors_mapped():
    assert mapped_after_a_big_free("default") == 0  # glibc's own behaviour: the heap serves it
    assert mapped_after_a_big_free("fixed") == 1  # with the stage setting: its own mapping


def test_every_stage_process_fixes_it(tiny_model):
    from pipeserve import LLM

    with LLM(tiny_model, dtype="float32", pipeline_parallel_size=2, threads_per_worker=1, max_model_len=64) as llm:
        stats = llm.engine.executor.collect_stats()
    assert [s["malloc_mmap_threshold"] for s in stats] == [STAGE_MMAP_THRESHOLD] * 2
