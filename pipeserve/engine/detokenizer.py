"""Incremental detokenization and stop strings, per request."""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding the whole output each step.

    With a fast (Rust-backed) tokenizer, the `tokenizers` library's own `DecodeStream` does it in one native
    call per token: it buffers tokens until they form valid UTF-8 and applies the decoder's leading-space
    rules as a full decode would. Otherwise a short window starting a few tokens back (`prefix_offset`) is
    decoded twice per token; a delta ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self._backend is not None else None

    def append(self, token_id: int) -> str:
        """Add one token; returns the new text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return ""
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
            self.text += delta
            return delta
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta


def find_stop_string(text: str, delta_len: int, stops: list[str]) -> tuple[str, int] | None:
    """The first stop string that the last `delta_len` characters completed, and where it starts."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[1]):
            best = (stop, pos)
    return best
