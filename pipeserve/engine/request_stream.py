"""What a caller iterates for one submitted request: its cumulative outputs, one choice per child request.

A request with `n` choices runs as `n` engine requests (its children, as vLLM's ParentRequest fans out);
the stream gathers them into one RequestOutput whose `outputs[i]` is choice i, finished once every choice
is. With n = 1 the one child is the request itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from pipeserve.engine.request import Request
from pipeserve.outputs import CompletionOutput, RequestOutput


class RequestStream:
    """Cumulative outputs of one request as it advances; the last has `finished=True`.

    An output is built when the listener asks for the next one, from the requests' state at that moment:
    a listener that falls behind gets one output covering every token since its last (as vLLM's streams
    coalesce), and a `final_only` stream (offline generation) is woken, and builds an output, only once
    every choice has finished. However the iteration ends (the last output read, or a listener that left
    early: a client that went away) the stream calls `end(request_id)`, which ends every choice still running
    and frees what the request holds.
    """

    def __init__(self, request_id: str, children: list[Request], output: Callable[[Request], RequestOutput],
                 end: Callable[[str], None], final_only: bool = False):
        """`output(request)`: a child's cumulative output now; `end(request_id)`: the engine's one way to end
        a request."""
        self.request_id, self.children = request_id, children
        self._output, self._end = output, end
        self.final_only = final_only
        self._ready = asyncio.Event()
        self._error: BaseException | None = None
        self._done: dict[int, CompletionOutput] = {}  # choices already finished: their last output
        self._unfinished = len(children)
        self._prompt_logprobs = None  # the request's, once its first choice has them

    @property
    def request(self) -> Request:
        """The first (with n = 1, the only) engine request."""
        return self.children[0]

    def wake(self, finished: bool = False) -> None:
        """A choice advanced (`finished`: it ended). A final_only stream wakes only when the last one ends."""
        if finished:
            self._unfinished -= 1
        if not self.final_only or self._unfinished == 0:
            self._ready.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._ready.set()

    def _build(self) -> RequestOutput:
        if len(self.children) == 1:  # the common case: the request's own output is the stream's (same id)
            return self._output(self.children[0])
        completions = []
        for i, req in enumerate(self.children):
            c = self._done.get(i)
            if c is None:
                out = self._output(req)
                c = out.outputs[0]
                c.index = i
                if i == 0 and out.prompt_logprobs is not None:
                    self._prompt_logprobs = out.prompt_logprobs
                if c.finish_reason is not None:
                    self._done[i] = c  # its detokenizer state is gone: keep the final output
            completions.append(c)
        first = self.children[0]
        return RequestOutput(self.request_id, first.prompt, first.prompt_token_ids, completions,
                             finished=len(self._done) == len(self.children),
                             num_cached_tokens=first.num_cached_tokens, prompt_logprobs=self._prompt_logprobs)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if self._error is not None:
                    raise self._error
                out = self._build()
                yield out
                if out.finished:
                    return
        finally:
            self._end(self.request_id)
