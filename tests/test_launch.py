"""The `pipeserve` command's fast start: which commands fork stage processes before the CLI runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import tiny_with_tokenizer

from pipeserve.entrypoints.launch import local_ranks


@pytest.mark.parametrize(("argv", "ranks"), [
    (["serve", "-pp", "2"], 2),
    (["serve", "m.gguf", "--pipeline-parallel-size", "2", "-tp", "2"], 4),
    (["generate", "-pp", "3", "--prompt", "hi"], 3),
    (["bench", "throughput", "-pp", "2"], 2),
    (["serve"], 0),  # one process: nothing to fork
    (["serve", "-pp", "2", "--nnodes", "2"], 0),  # several machines: ranks start elsewhere
    (["worker", "-pp", "2"], 0),
    (["serve", "-pp", "two"], 0),  # malformed: the CLI reports it
    (["serve", "-pp", "2", "--help"], 0),
    ([], 0),
])
def test_local_ranks(argv, ranks):
    assert local_ranks(argv) == ranks


def test_importing_pipeserve_does_not_import_torch():
    """The command must fork its stage processes before anything has started a thread, so the package
    itself loads nothing heavy until a public name is used."""
    code = "import sys, pipeserve.entrypoints.launch; print('pipeserve.engine.llm' in sys.modules, " \
           "'torch' in sys.modules); pipeserve.LLM; print('pipeserve.engine.llm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


@pytest.mark.slow
def test_generate_with_forked_stages_matches_one_process(tmp_path_factory):
    """`pipeserve generate -pp 2` through the command's entry (forked stages) prints what PP=1 prints."""
    model = tiny_with_tokenizer(tmp_path_factory)

    def run(*extra: str) -> str:
        cmd = [sys.executable, "-m", "pipeserve.entrypoints.launch", "generate", "--model", model,
               "--dtype", "float32", "--prompt", "hi", "--raw", "--max-tokens", "8", "--threads-per-worker", "1",
               *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(extra) or 'PP=1'} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    assert run("-pp", "2") == run()
