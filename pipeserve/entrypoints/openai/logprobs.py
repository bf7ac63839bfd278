"""The engine's per-token logprob dicts in the two OpenAI shapes: legacy completions and chat."""

from __future__ import annotations

from pipeserve.entrypoints.openai.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from pipeserve.outputs import Logprob


def token_text(token_id: int, lp: Logprob) -> str:
    # Without a tokenizer there is no text; vLLM's spelling for that case keeps the id visible.
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int,
                        text_offset: int = 0) -> CompletionLogprobs:
    """`tokens`, `token_logprobs`, `top_logprobs` (the top `num_top` and the chosen token) and `text_offset`."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = entry[tid]
        text = token_text(tid, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob)
        top = {token_text(t, lp): lp.logprob for t, lp in entry.items() if lp.rank <= num_top or t == tid}
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int) -> ChatLogprobs:
    """One entry per generated token with its `top_logprobs` (the `num_top` most likely, by rank)."""
    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = entry[tid]
        text = token_text(tid, chosen)
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank <= num_top), key=lambda x: x[1].rank)
        top = [TopLogprob(token=token_text(t, lp), logprob=lp.logprob, bytes=list(token_text(t, lp).encode()))
               for t, lp in ranked]
        content.append(ChatTokenLogprob(token=text, logprob=chosen.logprob, bytes=list(text.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)
