"""Async scheduling's planning ahead, for one virtual engine: which running decodes get their next step planned
before the token that step reads is known.

Such a decode goes out with the input id `types.PLACEHOLDER`; the stage fills in the id the step in flight
samples, on the device (worker/sampled_ids.py). A request has at most one decode planned ahead, and none when
that decode could not run anyway or needs the token's value on the host (`can_plan_ahead`). The token may turn
out to end the request (EOS, a stop token or string): the scheduler then finishes it one step late, and the
extra step's result is dropped like any result of a request that is no longer running (`Scheduler.update`).
"""

from __future__ import annotations

from pipeserve.engine.request import Request


class PlanAhead:
    """Whether the scheduler plans decodes ahead now, and how many it has planned so far."""

    def __init__(self, enabled: bool):
        self.enabled = enabled  # async scheduling, where the executor keeps sampled ids on the device
        self.num_planned_ahead = 0  # decodes planned before their input token was known, since start
        # Penalized requests need their tokens on the host before their next step: while one is here, every
        # step is planned synchronously (planning the others ahead would leave it every other step).
        self._num_sync_only = 0

    @property
    def active(self) -> bool:
        return self.enabled and not self._num_sync_only

    def added(self, req: Request) -> None:
        """A request joined the scheduler."""
        self._num_sync_only += req.sampling_params.penalized

    def ended(self, req: Request) -> None:
        """A request `added` left it."""
        self._num_sync_only -= req.sampling_params.penalized


def can_plan_ahead(req: Request) -> bool:
    """Whether the request (all of whose tokens are planned) may have its next decode planned now, before the
    token its step in flight samples is known: that step is a decode of a request the stages know, the token
    it samples cannot end the request by length (no next step then), and nothing of the next step depends on
    the token's value on the host (a recovery catches up first; penalties count the tokens seen, so nothing
    is planned ahead while a penalized request is here: `PlanAhead.active`)."""
    return (req.num_inflight_tokens == 1 and req.blocks_sent is not None and bool(req.output_token_ids)
            and req.num_tokens + 1 < req.length_limit and not req.kv_held_tokens and not req.num_failed_steps)
