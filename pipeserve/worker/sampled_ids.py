"""Async scheduling on the stage that both embeds and samples (PP=1): sampled ids stay on the device.

The engine may plan a request's next decode before the token it is waiting for reached the host; that
decode's input id is `types.PLACEHOLDER`. `SampledIds` keeps each request's latest sampled id on the device,
in a tensor indexed by the request's persistent row (input_batch.py), and writes it into the placeholder
rows of the next step's input ids: a gather and a `where`, queued on the stream behind the step that sampled
it, so the host never waits. A CUDA graph reads the filled static input buffer as it reads any other.

`PendingStep` is a sampled step whose ids (and logprob records) are on their way to the host: copied into
pinned memory without waiting, with an event recorded after the copy. `result()` waits for that event only,
so whoever calls it (the executor's waiter thread) blocks while the host goes on issuing the next step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeserve.types import PLACEHOLDER, SampledToken, ScheduledRequest, StepOutput


class SampledIds:
    """(rows,) int64 on the device: the id each persistent row's request sampled last."""

    def __init__(self, device: str, rows: int = 64):
        self.device = device
        self.last = torch.zeros(rows, dtype=torch.long, device=device)

    def reserve(self, rows: int) -> None:
        """Room for `rows` persistent rows (the input batch grew between steps)."""
        if rows > self.last.shape[0]:
            grown = torch.zeros(max(rows, 2 * self.last.shape[0]), dtype=torch.long, device=self.device)
            grown[: self.last.shape[0]].copy_(self.last)
            self.last = grown

    def record(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """The step sampled ids (S,) for the requests of persistent rows `rows` (S,), both on the device."""
        self.last.index_copy_(0, rows, ids)

    def fill(self, input_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace the placeholder entries of `input_ids` (n,) with the last id of their row in `rows` (n,)."""
        input_ids.copy_(torch.where(input_ids == PLACEHOLDER, self.last.index_select(0, rows), input_ids))

    def fill_at(self, input_ids: torch.Tensor, at: list[int], rows: list[int]) -> None:
        """Entries `at` of `input_ids` are placeholders of the requests of persistent rows `rows`."""
        input_ids.index_copy_(0, self.to_device(at), self.last.index_select(0, self.to_device(rows)))

    def to_device(self, values: list[int]) -> torch.Tensor:
        """A few ints on the device, through pinned memory without waiting (a pageable copy would wait for
        every step queued before it)."""
        if torch.device(self.device).type != "cuda":
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor(values, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)


def placeholder_rows(decodes: list[ScheduledRequest]) -> list[int]:
    """Indices of the decodes whose input id is a placeholder."""
    return [i for i, r in enumerate(decodes) if r.token_ids[0] == PLACEHOLDER]


class PendingStep:
    """A step whose sampled tokens are being copied to the host; `result()` is its StepOutput."""

    def __init__(self, step: StepOutput, reqs: list[ScheduledRequest], packed: torch.Tensor,
                 read: Callable[[list], list[SampledToken]]):
        self._step, self._reqs, self._read = step, reqs, read
        self._on_done: list[Callable[[], None]] = []
        if packed.device.type == "cuda":
            self._host = packed.to("cpu", non_blocking=True)  # lands in pinned memory
            self._done: torch.cuda.Event | None = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(packed.device))  # the copy's device, whichever is current
        else:
            self._host, self._done = packed, None

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when `result()` finds the step complete (on whichever thread calls it)."""
        self._on_done.append(callback)

    def ready(self) -> bool:
        """Whether `result()` would return without waiting for the device."""
        return self._done is None or self._done.query()

    def result(self) -> StepOutput:
        """Wait for the copy (and the step before it), then the step's tokens as the engine takes them."""
        try:
            if self._done is not None:
                self._done.synchronize()
        finally:  # a failed step has ended too
            callbacks, self._on_done = self._on_done, []
            for callback in callbacks:
                callback()
        tokens = self._read(self._host.tolist())
        step, reqs = self._step, self._reqs
        step.sampled = {r.req_id: t.token_id for r, t in zip(reqs, tokens, strict=True)}
        step.logprobs = {r.req_id: t for r, t in zip(reqs, tokens, strict=True)
                         if r.sampling_params.logprobs is not None}
        return step
