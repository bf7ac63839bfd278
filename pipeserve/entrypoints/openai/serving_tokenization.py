"""vLLM's tokenizer endpoints: POST /tokenize (a prompt, or chat messages through the chat template) and
POST /detokenize, so that clients can count tokens and check outputs token by token."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.entrypoints.openai.chat_messages import ChatMessage
from pipeserve.entrypoints.openai.errors import APIError

_CONFIG = ConfigDict(strict=True, extra="forbid")


class TokenizeRequest(BaseModel):
    """Either `prompt` (a text) or `messages` (a conversation, rendered by the chat template)."""

    model_config = _CONFIG
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizationServing:
    """Serves /tokenize and /detokenize with the engine's tokenizer."""

    def __init__(self, engine: AsyncEngine, served_model_names: list[str]):
        self.engine, self.served_model_names = engine, served_model_names
        self.tokenizer = engine.tokenizer

    def _check(self, model: str | None) -> Any:
        if model is not None and model not in self.served_model_names:
            raise APIError(f"the model {model!r} does not exist", 404, "model", "model_not_found")
        if self.tokenizer is None:
            raise APIError("this model ships no tokenizer", 400)
        return self.tokenizer

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        tok = self._check(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of 'prompt' and 'messages'", 400, "prompt")
        if req.messages is not None:
            if not req.messages:
                raise APIError("messages must not be empty", 400, "messages")
            if not getattr(tok, "chat_template", None):
                raise APIError("this model has no chat template", 400, "messages")
            try:
                text = tok.apply_chat_template([m.for_template() for m in req.messages], tokenize=False,
                                               add_generation_prompt=req.add_generation_prompt)
            except Exception as exc:  # templates raise on conversations they do not accept
                raise APIError(f"the chat template rejected the messages: {exc}", 400, "messages") from None
            special = bool(req.add_special_tokens)
        else:
            text = req.prompt
            special = req.add_special_tokens is not False
        ids = tok.encode(text, add_special_tokens=special)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.config.scheduler.max_model_len,
                                tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        tok = self._check(req.model)
        vocab = self.engine.config.model.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"tokens must be in [0, {vocab}), got {bad}", 400, "tokens")
        return DetokenizeResponse(prompt=tok.decode(req.tokens))
