"""The one check of a request against the engine's limits, run as the engine accepts it (`add_request`).

`SamplingParams` checks what it can alone (ranges of its own fields); this checks what needs the engine's
configuration: the prompt against the vocabulary and `max_model_len`, token ids the sampler will index
logits by, and the size of the stop list (every stop string is looked for in the text after every token).
Callers (the server, `LLM`) map the ValueError to their own errors; its message names the field first.
"""

from __future__ import annotations

from pipeserve.config import EngineConfig
from pipeserve.sampling_params import SamplingParams


def validate_request(config: EngineConfig, prompt_token_ids: list[int], params: SamplingParams,
                     cache_salt: str | None = None) -> int:
    """Raise ValueError naming what is out of the engine's limits; returns the request's resolved max_tokens
    (by default all the room `max_model_len` leaves after the prompt)."""
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError("cache_salt must be a non-empty string")
    _check_token_ids(config.model.vocab_size, prompt_token_ids, params)
    _check_stop_strings(config, params.stop_strings)
    n, limit = len(prompt_token_ids), config.scheduler.max_model_len
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
    if n + max_tokens > limit:
        raise ValueError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                         f"max_model_len={limit}")
    if max_tokens < 1:
        raise ValueError(f"the prompt ({n} tokens) leaves no room to generate within max_model_len={limit}")
    return max_tokens


def _check_token_ids(vocab: int, prompt_token_ids: list[int], params: SamplingParams) -> None:
    if not prompt_token_ids:
        raise ValueError("prompt must not be empty")
    if any(not 0 <= t < vocab for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if any(not 0 <= t < vocab for t in params.stop_token_ids or ()):  # the sampler indexes logits by them
        raise ValueError(f"stop_token_ids must be in [0, {vocab})")
    if any(not 0 <= t < vocab for t in params.logit_bias or ()):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab})")


def _check_stop_strings(config: EngineConfig, stops: list[str]) -> None:
    """Bounded, because each is searched for after every token of the request (OpenAI allows 4)."""
    if len(stops) > config.max_stop_strings:
        raise ValueError(f"stop has {len(stops)} strings, more than this server's limit of "
                         f"{config.max_stop_strings} (--max-stop-strings)")
    longest = max(map(len, stops), default=0)
    if longest > config.max_stop_string_length:
        raise ValueError(f"stop has a string of {longest} characters, longer than this server's limit of "
                         f"{config.max_stop_string_length} (--max-stop-string-length)")
