"""The engine's per-token logprob dicts in the two OpenAI shapes: legacy completions and chat.

A token's text is its decoded text, or `token_id:N` when the client asked for `return_tokens_as_token_ids`
(vLLM's spelling, so that clients can check outputs token by token even where a token is not valid UTF-8
on its own) or when the model has no tokenizer.
"""

from __future__ import annotations

from typing import Any

from pipeserve.entrypoints.openai.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from pipeserve.outputs import Logprob


class TokenText:
    """How a token id is shown in logprobs."""

    def __init__(self, tokenizer: Any | None, as_token_ids: bool):
        self.tokenizer, self.as_token_ids = tokenizer, as_token_ids

    def __call__(self, token_id: int, lp: Logprob | None = None) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        if self.tokenizer is not None:
            return self.tokenizer.decode([token_id])
        return f"token_id:{token_id}"


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob] | None], num_top: int,
                        text_offset: int, tokenizer: Any | None, as_token_ids: bool) -> CompletionLogprobs:
    """`tokens`, `token_logprobs`, `top_logprobs` (the top `num_top` and the chosen token) and `text_offset`.
    An entry of None (the first prompt token under echo) has no logprob."""
    show = TokenText(tokenizer, as_token_ids)
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = entry[tid] if entry is not None else None
        text = show(tid, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        out.top_logprobs.append(None if entry is None else
                                {show(t, lp): lp.logprob for t, lp in entry.items() if lp.rank <= num_top or t == tid})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int, tokenizer: Any | None,
                  as_token_ids: bool) -> ChatLogprobs:
    """One entry per generated token with its `top_logprobs` (the `num_top` most likely, by rank)."""
    show = TokenText(tokenizer, as_token_ids)
    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = entry[tid]
        text = show(tid, chosen)
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank <= num_top), key=lambda x: x[1].rank)
        top = [TopLogprob(token=show(t, lp), logprob=lp.logprob, bytes=list(show(t, lp).encode()))
               for t, lp in ranked]
        content.append(ChatTokenLogprob(token=text, logprob=chosen.logprob, bytes=list(text.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)
