"""POST /v1/chat/completions: messages through the model's chat template, `n` assistant replies, whole or
streamed."""

from __future__ import annotations

from typing import Any

from pipeserve.entrypoints.openai.errors import APIError
from pipeserve.entrypoints.openai.logprobs import chat_logprobs
from pipeserve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
)
from pipeserve.entrypoints.openai.serving import OpenAIServing, Prompt, SentSoFar, usage_dict
from pipeserve.outputs import CompletionOutput, RequestOutput


class ChatServing(OpenAIServing):
    """Serves /v1/chat/completions."""

    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def prompts(self, req: ChatCompletionRequest) -> list[Prompt]:
        return [self.apply_template(req.messages)]

    def limits(self, req: ChatCompletionRequest) -> tuple[int | None, int | None]:
        return req.max_new_tokens(), req.num_logprobs()

    def apply_template(self, messages: list[ChatMessage]) -> Prompt:
        """The conversation as the model was trained to see it, ending where the assistant speaks next."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError("this model has no chat template: use /v1/completions", 400, "messages")
        conversation = [m.for_template() for m in messages]
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on conversations they do not accept (e.g. role order)
            raise APIError(f"the chat template rejected the messages: {exc}", 400, "messages") from None
        # The template already holds the special tokens (BOS and friends): do not add them twice.
        return Prompt(tok.encode(text, add_special_tokens=False), text)

    def response(self, req: ChatCompletionRequest, request_id: str, prompts: list[Prompt],
                 finals: list[RequestOutput]) -> ChatCompletionResponse:
        (final,) = finals
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(req, c, 0), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason) for c in final.outputs]
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_dict(finals))

    def first_choices(self, req: ChatCompletionRequest, num_choices: int) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(num_choices)]

    def choice_delta(self, req: ChatCompletionRequest, prompt: Prompt, out: RequestOutput, c: CompletionOutput,
                     sent: SentSoFar, index: int) -> dict[str, Any] | None:
        if sent.finished:
            return None
        new_text = c.text[sent.text_len:]
        if not new_text and len(c.token_ids) == sent.num_tokens and c.finish_reason is None:
            return None
        logprobs = self._logprobs(req, c, sent.num_tokens)
        sent.text_len, sent.num_tokens, sent.finished = len(c.text), len(c.token_ids), c.finish_reason is not None
        return {"index": index, "delta": {"content": new_text},
                "logprobs": logprobs.model_dump() if logprobs else None, "finish_reason": c.finish_reason}

    def _logprobs(self, req: ChatCompletionRequest, c: CompletionOutput, from_token: int) -> ChatLogprobs | None:
        if not req.logprobs:
            return None
        return chat_logprobs(c.token_ids[from_token:], (c.logprobs or [])[from_token:], req.top_logprobs or 0,
                             self.tokenizer, req.return_tokens_as_token_ids)
