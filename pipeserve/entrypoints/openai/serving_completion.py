"""POST /v1/completions: a text, texts, or token ids in; `n` choices per prompt out, whole or streamed.

`echo` puts the prompt before each choice's text (and, with `logprobs`, the prompt tokens before its tokens,
the first with no logprob), as the legacy OpenAI API does.
"""

from __future__ import annotations

from typing import Any

from pipeserve.entrypoints.openai.logprobs import completion_logprobs
from pipeserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from pipeserve.entrypoints.openai.serving import OpenAIServing, Prompt, SentSoFar, usage_dict
from pipeserve.outputs import CompletionOutput, RequestOutput


class CompletionServing(OpenAIServing):
    """Serves /v1/completions."""

    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        return [self.echoable(self.encode(p)) if req.echo else self.encode(p) for p in req.prompts()]

    def echoable(self, prompt: Prompt) -> Prompt:
        """A token-id prompt gets its text, for echo."""
        if prompt.text is None and self.tokenizer is not None:
            prompt.text = self.tokenizer.decode(prompt.token_ids)
        return prompt

    def limits(self, req: CompletionRequest) -> tuple[int | None, int | None]:
        return req.max_tokens, req.logprobs

    def response(self, req: CompletionRequest, request_id: str, prompts: list[Prompt],
                 finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, (prompt, out) in enumerate(zip(prompts, finals, strict=True)):
            for c in out.outputs:
                text = (prompt.text or "") + c.text if req.echo else c.text
                choices.append(CompletionChoice(index=i * len(out.outputs) + c.index, text=text,
                                                logprobs=self._logprobs(req, prompt, out, c, 0, 0, True),
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_dict(finals))

    def choice_delta(self, req: CompletionRequest, prompt: Prompt, out: RequestOutput, c: CompletionOutput,
                     sent: SentSoFar, index: int) -> dict[str, Any] | None:
        if sent.finished:
            return None
        first = sent.text_len == 0 and sent.num_tokens == 0
        new_text, new_ids = c.text[sent.text_len:], c.token_ids[sent.num_tokens:]
        if not new_text and not new_ids and c.finish_reason is None and not (first and req.echo):
            return None
        logprobs = self._logprobs(req, prompt, out, c, sent.num_tokens, sent.text_offset, first)
        if logprobs is not None:
            sent.text_offset += sum(len(t) for t in logprobs.tokens)
        if first and req.echo:
            new_text = (prompt.text or "") + new_text
        sent.text_len, sent.num_tokens, sent.finished = len(c.text), len(c.token_ids), c.finish_reason is not None
        return {"index": index, "text": new_text, "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _logprobs(self, req: CompletionRequest, prompt: Prompt, out: RequestOutput, c: CompletionOutput,
                  from_token: int, text_offset: int, with_prompt: bool) -> CompletionLogprobs | None:
        if req.logprobs is None:
            return None
        ids, entries = c.token_ids[from_token:], list((c.logprobs or [])[from_token:])
        if req.echo and with_prompt:  # the prompt's tokens first; the first one has no logprob
            ids, entries = prompt.token_ids + ids, list(out.prompt_logprobs or []) + entries
        return completion_logprobs(ids, entries, req.logprobs, text_offset, self.tokenizer,
                                   req.return_tokens_as_token_ids)
