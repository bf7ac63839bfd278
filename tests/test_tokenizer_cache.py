"""The GGUF tokenizer is converted once and then loaded from the cache, identical to a fresh conversion."""

from __future__ import annotations

import os

import pytest

from pipeserve.loader import tokenizer_cache
from pipeserve.loader.default_model import default_model_path
from pipeserve.loader.gguf_loader import load_gguf_tokenizer

pytestmark = pytest.mark.slow

TEXTS = ["Hello world", "def f(x):\n    return x**2  # héllo 🚀", "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "user", "content": "Name a river."}]


def test_cached_tokenizer_equals_the_converted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "CACHE_ROOT", str(tmp_path))
    path = default_model_path()
    built = load_gguf_tokenizer(path)
    folder = tokenizer_cache.cache_dir(path)
    assert os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    cached = load_gguf_tokenizer(path)
    for text in TEXTS:
        assert cached.encode(text) == built.encode(text)
    assert cached.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        built.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (cached.bos_token_id, cached.eos_token_id, len(cached)) == (built.bos_token_id, built.eos_token_id,
                                                                      len(built))


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "CACHE_ROOT", str(tmp_path))
    path = default_model_path()
    folder = tokenizer_cache.cache_dir(path)
    os.makedirs(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    tok = load_gguf_tokenizer(path)
    assert tok.encode("Hello world")
    assert load_gguf_tokenizer(path).encode("Hello world") == tok.encode("Hello world")  # the repaired entry
