"""The output side of the engine: a request's new tokens become the RequestOutput its listener receives.

Detokenizes incrementally, and only when the text is needed (a stop string to look for, or a listener
reading), finds stop strings (cutting them from the text), holds back streamed text that
could still become a stop string (so streamed text never shrinks), and builds logprob dicts. It never
changes a request's status: the scheduler asks it, as it applies a token, whether the request's text now
ends with a stop string (`find_stop_string`), and finishes the request itself.
"""

from __future__ import annotations

from typing import Any

from pipeserve.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from pipeserve.engine.request import Request, RequestStatus
from pipeserve.outputs import CompletionOutput, Logprob, RequestOutput
from pipeserve.types import SampledToken


class OutputProcessor:
    """Per-request detokenizer state, from `add` until `remove` (when the request ends: `AsyncEngine._end`)."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompt_lps: dict[str, list] = {}  # requests' prompt logprobs, once complete

    def add(self, req: Request) -> None:
        self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.sampling_params.skip_special_tokens)

    def remove(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        self._prompt_lps.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._detok)

    def bookkeeping(self) -> dict[str, int]:
        return {"detokenizers": len(self._detok), "prompt_logprobs": len(self._prompt_lps)}

    def find_stop_string(self, req: Request) -> str | None:
        """Take the request's new tokens into its text now; returns the stop string they completed, if any
        (already cut from the text), for the scheduler to finish the request with."""
        detok = self._detok[req.request_id]
        delta = self._catch_up(req, detok)
        stops = req.sampling_params.stop_strings
        hit = find_stop_string(detok.text, len(delta), stops) if delta and stops else None
        if hit is None:
            return None
        detok.text = detok.text[: hit[1]]
        return hit[0]

    @staticmethod
    def _catch_up(req: Request, detok: IncrementalDetokenizer) -> str:
        """Detokenize the output tokens not yet in the text; returns the new text."""
        upto = len(req.output_token_ids)
        if req.status == RequestStatus.FINISHED_STOPPED and not isinstance(req.stop_reason, str):
            upto -= 1  # as in vLLM, the token that stopped a request (EOS, a stop token) adds no text
        return "".join(detok.append(t) for t in req.output_token_ids[len(detok.token_ids): upto])

    def output(self, req: Request) -> RequestOutput:
        """The request's cumulative output now."""
        params = req.sampling_params
        detok = self._detok[req.request_id]
        self._catch_up(req, detok)
        text = detok.text
        finished = req.status.finished
        if not finished and params.stop_strings:
            # Hold back what could be the start of a stop string, so streamed text never shrinks.
            text = text[: max(0, len(text) - max(len(s) for s in params.stop_strings) + 1)]
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(req.output_token_ids),
            finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason,
        )
        if params.logprobs is not None:
            completion.logprobs = [self._logprob_dict(s) for s in req.output_logprobs]
            completion.cumulative_logprob = sum(s.logprob for s in req.output_logprobs)
        prompt_logprobs = self._prompt_logprobs(req)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], finished=finished,
                             num_cached_tokens=req.num_cached_tokens, prompt_logprobs=prompt_logprobs)

    def _prompt_logprobs(self, req: Request) -> list[dict[int, Logprob] | None] | None:
        """[None (the first token has none), then one dict per prompt token], once every one is scored (built
        once: a streamed request is read every step)."""
        if req.sampling_params.prompt_logprobs is None or len(req.prompt_logprobs) < len(req.prompt_token_ids) - 1:
            return None
        built = self._prompt_lps.get(req.request_id)
        if built is None:
            built = self._prompt_lps[req.request_id] = [None] + [self._logprob_dict(s) for s in req.prompt_logprobs]
        return built

    def _logprob_dict(self, sampled: SampledToken) -> dict[int, Logprob]:
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        entries = {t: Logprob(lp, rank + 1, decode(t)) for rank, (t, lp) in enumerate(sampled.top_logprobs or [])}
        if sampled.token_id not in entries:
            entries[sampled.token_id] = Logprob(sampled.logprob, sampled.rank, decode(sampled.token_id))
        return entries
