"""A GGUF's tokenizer, converted once and kept on disk.

transformers rebuilds a GGUF's tokenizer from the file's metadata (49k tokens and merges for SmolLM2) at
every start, which takes seconds on a small CPU. The converted tokenizer is saved under
~/.cache/pipeserve/tokenizers, keyed by the file's path, size and modification time and by the transformers
version, and loaded from there afterwards. The cache is an optimisation only: if it cannot be read or
written, the tokenizer is built from the file as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "pipeserve", "tokenizers")


def cache_dir(gguf_path: str) -> str:
    import transformers

    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    return os.path.join(CACHE_ROOT, hashlib.sha256(key.encode()).hexdigest()[:24])


def cached_tokenizer(gguf_path: str, build: Callable[[], Any]) -> Any:
    """The tokenizer saved for this file, else `build()` (then saved for next time)."""
    from transformers import AutoTokenizer

    folder = cache_dir(gguf_path)
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry: rebuild it
            logger.warning("ignoring the cached tokenizer in %s: %s", folder, exc)
    tok = build()
    _save(tok, folder)
    return tok


def _save(tok: Any, folder: str) -> None:
    """Save into a temporary folder, then rename: a concurrent reader never sees half a tokenizer."""
    try:
        os.makedirs(CACHE_ROOT, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=CACHE_ROOT)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:  # read-only home, full disk: run without the cache
        logger.info("not caching the tokenizer in %s: %s", folder, exc)
