"""What `LLM.generate` returns (vLLM's `RequestOutput` / `CompletionOutput` fields)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token and its rank among the vocabulary (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its outputs; `finished` is True once every output has ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache (None: not yet run)
    # With SamplingParams.prompt_logprobs: per prompt token, its logprob given the tokens before it (None for
    # the first), with the top alternatives.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
