"""What a stage keeps of each request between steps, so that a step plan carries only what changed.

A request's block table and sampling params reach the stages once (a `new` entry); later entries carry the
blocks appended since. Every stage (and TP rank) receives every plan in the same order, so all of them hold
the same state. The state belongs to one generation of the process group: a new generation starts empty,
and the engine, which forgets what it sent when the generation changes, sends every request whole again.

Block tables are kept twice: as lists, which resolved entries carry (prefill chunks build their metadata
from them), and in the persistent rows of `batch` (input_batch.py), which decode steps gather from.
"""

from __future__ import annotations

from pipeserve.sampling_params import SamplingParams
from pipeserve.types import ScheduledRequest, SchedulerOutput
from pipeserve.worker.input_batch import InputBatch


class RequestStates:
    """Per request: the whole block table and the sampling params, from its `new` entry until it finishes;
    for a penalized request also every token it has seen."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}
        self._params: dict[str, SamplingParams] = {}
        self._seen: dict[str, list[int]] = {}
        self._prompts: dict[str, list[int]] = {}  # requests that asked for prompt logprobs
        self._generation: int | None = None
        self.batch = InputBatch()  # the same tables as rows of one array

    def __len__(self) -> int:
        return len(self._tables)

    def resolve(self, sched: SchedulerOutput, generation: int = 0) -> SchedulerOutput:
        """Apply an incremental plan; returns it with whole block tables and the params of sampling requests."""
        if generation != self._generation:  # a new group: nothing from the old one is valid
            self._tables.clear()
            self._params.clear()
            self._seen.clear()
            self._prompts.clear()
            self.batch.clear()
            self._generation = generation
        for req_id in sched.finished_req_ids:
            self._tables.pop(req_id, None)
            self._params.pop(req_id, None)
            self._seen.pop(req_id, None)
            self._prompts.pop(req_id, None)
            self.batch.remove(req_id)
        resolved = self._resolve_decodes(sched) if sched.decodes else []
        for r in sched.requests:
            seen = None
            if r.new:
                table = self._tables[r.req_id] = list(r.block_table)
                self.batch.add(r.req_id, table)
                params = self._params[r.req_id] = r.sampling_params
                if r.prefix_token_ids is not None:
                    seen = self._seen[r.req_id] = list(r.prefix_token_ids)
                else:
                    self._seen.pop(r.req_id, None)
                if r.prompt_token_ids is not None:
                    self._prompts[r.req_id] = r.prompt_token_ids
                else:
                    self._prompts.pop(r.req_id, None)
            else:
                table, params = self._known(sched, r.req_id)
                table.extend(r.block_table)
                self.batch.append(r.req_id, r.block_table)
                seen = self._seen.get(r.req_id)
            if seen is not None:
                del seen[r.start_pos:]  # chunks of a step abandoned after it reached this stage are redone
                seen.extend(r.token_ids)
            prompt = self._prompts.get(r.req_id)
            scores_prompt = prompt is not None and r.start_pos < len(prompt) - 1
            resolved.append(ScheduledRequest(
                r.req_id, r.token_ids, r.start_pos, table, params if r.samples else None, r.num_output_tokens,
                r.last_stage, False, r.samples, None, seen if r.samples else None,
                prompt if scores_prompt else None, params.prompt_logprobs if scores_prompt else None))
        return SchedulerOutput(sched.step_id, sched.virtual_engine, resolved)

    def _resolve_decodes(self, sched: SchedulerOutput) -> list[ScheduledRequest]:
        """Whole entries of the columnar decodes (each samples; none scores prompt tokens)."""
        d, seen_of, out = sched.decodes, self._seen, []
        for req_id, token, start, num_outputs in zip(d.req_ids, d.token_ids, d.start_pos, d.num_output_tokens,
                                                      strict=True):
            table, params = self._known(sched, req_id)
            blocks = d.new_blocks.get(req_id)
            if blocks:
                table.extend(blocks)
                self.batch.append(req_id, blocks)
            seen = seen_of.get(req_id)
            if seen is not None:
                del seen[start:]
                seen.append(token)
            out.append(ScheduledRequest(req_id, [token], start, table, params, num_outputs, None, False, True,
                                        None, seen))
        return out

    def _known(self, sched: SchedulerOutput, req_id: str) -> tuple[list[int], SamplingParams]:
        table = self._tables.get(req_id)
        if table is None:
            raise RuntimeError(f"step {sched.step_id} continues request {req_id}, which this stage "
                               f"was never sent whole (generation {self._generation})")
        return table, self._params[req_id]
