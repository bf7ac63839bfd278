"""The plan outputs quoted in docs/planning.md and the README's reference-case lines are what `pipeserve plan`
prints now (benchmarks/plan_docs.py regenerates them)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import plan_docs  # noqa: E402


def test_planning_doc_quotes_the_current_output():
    with open(plan_docs.PLANNING) as f:
        text = f.read()
    assert len(plan_docs.BLOCK.findall(text)) == 3 and plan_docs.GPU_TABLE.search(text)
    assert plan_docs.regenerate(text) == text, "stale: run python benchmarks/plan_docs.py"


def test_readme_reference_lines_are_current():
    with open(plan_docs.README) as f:
        text = f.read()
    assert plan_docs.REFERENCE.search(text) and "TP=4 x PP=2" in text and "405B" in text
    assert plan_docs.regenerate_readme(text) == text, "stale: run python benchmarks/plan_docs.py"
