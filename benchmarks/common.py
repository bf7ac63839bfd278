"""Shared pieces of the benchmark scripts: workload flags, running a CLI bench to JSON, writing the report."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

CLI = [sys.executable, "-m", "pipeserve.entrypoints.cli"]


def add_workload_flags(p: argparse.ArgumentParser, num_prompts: int) -> None:
    """The reference mix scaled to this machine: 1024-token prompts, 128 output tokens."""
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--markdown", default=None, help="write the table here too")
    p.add_argument("--output-json", default=None, help="write every raw measurement here")


def run_to_json(argv: list[str], wrap=lambda cmd: cmd) -> dict[str, Any]:
    """Run a pipeserve bench command (argv after `pipeserve`) with --output-json; return that JSON.

    `wrap` turns the command into what actually runs (e.g. inside a network namespace)."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        subprocess.run(wrap(CLI + argv + ["--output-json", out]), check=True, stdout=sys.stderr)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def write_report(text: str, markdown: str | None, output_json: str | None, data: Any) -> None:
    """Print the table; save it and the raw data where asked."""
    print(text)
    if markdown:
        os.makedirs(os.path.dirname(markdown) or ".", exist_ok=True)
        with open(markdown, "w") as f:
            f.write(text + "\n")
    if output_json:
        with open(output_json, "w") as f:
            json.dump(data, f, indent=2)


def busy_cell(fractions: list[float]) -> str:
    """Each stage's busy fraction, as a table cell: "91% / 98%"."""
    return " / ".join(f"{b:.0%}" for b in fractions)


WORKER_RESULT = "BENCH_RESULT "  # a worker prints its JSON result on a line starting with this


def run_worker(script: str, *args: str, python: str = sys.executable) -> dict[str, Any]:
    """Run `python script --worker ARGS` in a fresh process (a measurement untouched by earlier ones); the
    JSON it printed after WORKER_RESULT. Exits with the worker's stderr if it failed."""
    proc = subprocess.run([python, os.path.abspath(script), "--worker", *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WORKER_RESULT)]
    if proc.returncode or not lines:
        sys.exit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(WORKER_RESULT))
