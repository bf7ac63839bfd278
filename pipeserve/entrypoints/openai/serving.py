"""What both generation endpoints share: model names, prompts to token ids, validation, submission."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any

from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.entrypoints.openai.errors import APIError, param_of
from pipeserve.entrypoints.openai.metrics import RequestTimer, ServerMetrics
from pipeserve.entrypoints.openai.protocol import SamplingFields
from pipeserve.entrypoints.openai.streams import DEFAULT_SSE_KEEPALIVE_S, EngineRequest
from pipeserve.outputs import RequestOutput
from pipeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_PARAM_NAMES = {f.name for f in fields(SamplingParams)} | {"prompt", "stop_token_ids", "max_tokens", "cache_salt"}


@dataclass
class Prompt:
    """One prompt ready for the engine."""

    token_ids: list[int]
    text: str | None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIServing:
    """Turns validated request bodies into engine requests; every check raises an APIError."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, served_model_names: list[str],
                 sse_keepalive_s: float = DEFAULT_SSE_KEEPALIVE_S):
        self.engine, self.metrics = engine, metrics
        self.sse_keepalive_s = sse_keepalive_s
        self.served_model_names = served_model_names
        self.tokenizer = engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_request(self, req: SamplingFields) -> None:
        """Model name, supported fields, and a live engine."""
        if req.model is not None and req.model not in self.served_model_names:
            raise APIError(f"the model {req.model!r} does not exist: this server serves "
                           f"{', '.join(repr(n) for n in self.served_model_names)}", 404, "model", "model_not_found")
        req.check_supported()
        if req.model_extra:
            logger.warning("ignoring unsupported request fields: %s", ", ".join(sorted(req.model_extra)))
        try:
            self.engine.check_health()
        except Exception as exc:
            raise APIError(f"the engine is not running: {exc}", 503) from None

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as exc:
            raise APIError(str(exc), 400, param_of(str(exc), _PARAM_NAMES)) from None

    def encode(self, prompt: str | list[int]) -> Prompt:
        if not isinstance(prompt, str):
            return Prompt(list(prompt), None)
        if self.tokenizer is None:
            raise APIError("this model ships no tokenizer: send the prompt as token ids", 400, "prompt")
        return Prompt(self.tokenizer.encode(prompt), prompt)

    def submit(self, request_id: str, prompts: list[Prompt], params: SamplingParams, arrival: float,
               cache_salt: str | None = None) -> list[EngineRequest]:
        """Validate every prompt first (so a bad one starts nothing), then queue them all."""
        for i, p in enumerate(prompts):
            try:
                self.engine.validate(p.token_ids, params, cache_salt)
            except ValueError as exc:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise APIError(f"{where}{exc}", 400, param_of(str(exc), _PARAM_NAMES)) from None
        requests = []
        for i, p in enumerate(prompts):
            stream = self.engine.add_request(p.token_ids, params, p.text, request_id=f"{request_id}-{i}",
                                             cache_salt=cache_salt)
            requests.append(EngineRequest(self.engine, stream, RequestTimer(self.metrics, arrival,
                                                                             len(p.token_ids))))
        return requests

    @staticmethod
    def now() -> float:
        return time.monotonic()


def engine_failure(exc: Exception) -> APIError:
    """A request that failed inside the engine (a stage died): the server cannot serve it."""
    return APIError(f"the engine failed while serving the request: {exc}", 503)


def usage_dict(finals: list[RequestOutput]) -> dict[str, Any]:
    """Token counts of the finished requests of one API request; `cached_tokens`: prompt tokens whose KV came
    from the prefix cache."""
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens or 0 for o in finals)}}
