"""`SamplingParams`: how one request picks its tokens (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """Sampling settings of one request.

    temperature 0 (or below 1e-5) is greedy. `seed` makes a request's samples independent of the rest of the batch.
    `stop` strings are cut from the returned text; `stop_token_ids` (and EOS unless `ignore_eos`) end it.
    `logprobs=N` returns, per generated token, its log-probability and the top-N alternatives.
    `n` choices are generated for the prompt. Penalties, as in vLLM and OpenAI: `presence_penalty` is
    subtracted from the logit of every token already generated, `frequency_penalty` times how often it was;
    `repetition_penalty` (> 1 discourages) divides positive logits and multiplies negative ones of every
    token in the prompt or the output. `logit_bias` adds to the logits of the given token ids.
    `prompt_logprobs=N` returns, per prompt token after the first, its log-probability given the tokens before
    it and the top-N alternatives (a prompt that asks for them is computed whole, not taken from the cache).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} if self.logit_bias else None
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the tokens the request has seen (its prompt and outputs)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # As in vLLM, temperatures this small are greedy: dividing logits by them would overflow.
        return self.temperature < _GREEDY_BELOW

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0 ** 31:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for bias in (self.logit_bias or {}).values():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if any(not s for s in self._stop_list):
            raise ValueError("stop strings must be non-empty")
