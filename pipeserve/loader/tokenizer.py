"""The model's tokenizer and chat template, from an HF folder or a GGUF file's metadata."""

from __future__ import annotations

import os
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str) -> Any | None:
    """A transformers tokenizer, or None for a folder that ships none (token-id prompts only)."""
    if path.endswith(".gguf"):
        from pipeserve.loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
