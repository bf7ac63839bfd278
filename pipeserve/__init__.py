"""pipeserve: a pipeline-parallel LLM inference engine.

The public names load on first use, so that `import pipeserve.<anything>` does not import torch: the
`pipeserve` command starts its stage processes before that (entrypoints/launch.py).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_HOMES = {"LLM": "pipeserve.engine.llm", "SamplingParams": "pipeserve.sampling_params",
          "RequestOutput": "pipeserve.outputs", "CompletionOutput": "pipeserve.outputs"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'pipeserve' has no attribute {name!r}")
