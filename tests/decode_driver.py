"""Drives ModelRunners of one or more pipeline stages through a fixed scenario of greedy steps, without an
engine: prompts prefill, decode, one request finishes and another arrives mid-batch, the rest decode on.
Shared by the CPU tests of the padded static-buffer decode path and the CUDA graph tests."""

from __future__ import annotations

import torch

from pipeserve.distributed.stage import StageInfo
from pipeserve.loader.model_config import load_model_config
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import DecodeBatch, ScheduledRequest, SchedulerOutput
from pipeserve.worker.cuda_graphs import DecodeGraphs
from pipeserve.worker.model_runner import ModelRunner
from pipeserve.worker.request_states import RequestStates

BLOCK_SIZE, BLOCKS_PER_REQUEST, MAX_MODEL_LEN = 4, 24, 96
GREEDY = SamplingParams(temperature=0)
MIXED = {"a": GREEDY,  # plain greedy; the others sample through the whole sampler
         "b": SamplingParams(temperature=0, logprobs=2),
         "c": SamplingParams(temperature=0, repetition_penalty=1.5),
         "d": SamplingParams(temperature=0.8, seed=7, top_k=20)}
PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": list(range(3, 22)), "c": [100], "d": [7, 7, 7, 300, 12]}


def make_runners(path: str, stages: int = 1, device: str = "cpu", static: bool = False, dtype: str = "float32",
                 max_num_seqs: int = 16, enforce_eager: bool = True, capture: bool = True) -> list[ModelRunner]:
    """One runner per stage (layers split evenly); with `enforce_eager=False` a CUDA runner captures its
    graphs. `static`: give an eager runner the padded static-buffer decode path, its graphs captured when
    `capture` and the device has CUDA, else the same buffers run eagerly."""
    cfg = load_model_config(path, dtype)
    per = cfg.num_hidden_layers // stages
    runners = []
    for s in range(stages):
        end = cfg.num_hidden_layers if s == stages - 1 else (s + 1) * per
        runner = ModelRunner(cfg, StageInfo(s, stages, s * per, end), num_blocks_per_ve=4 * BLOCKS_PER_REQUEST,
                             block_size=BLOCK_SIZE, num_virtual_engines=2, max_model_len=MAX_MODEL_LEN, seed=0,
                             device=device, disable_progress=True, max_num_seqs=max_num_seqs,
                             enforce_eager=enforce_eager)
        if static and runner.graphs is None:
            runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.decode_inputs, cfg.hidden_size,
                                         cfg.torch_dtype, device)
            if capture:
                runner.graphs.capture()
        runners.append(runner)
    return runners


class Scenario:
    """Greedy decoding of PROMPTS on virtual engine 1: a, b, c start together; after 3 decode steps b
    finishes and d arrives (a mixed step); then a, c, d decode (3 rows: padded to 4 on the static path)."""

    def __init__(self, runners: list[ModelRunner], params: dict[str, SamplingParams] | None = None,
                 execute: bool = False):
        """`params`: per request (default greedy); `execute`: run steps through ModelRunner.execute (single
        stage), the runner sampling, instead of taking the argmax of the logits here."""
        self.runners, self.params, self.execute = runners, params or {}, execute
        self.outputs: list = []  # per step, with `execute`: the StepOutput
        self.states = [RequestStates() for _ in runners]
        self.tokens: dict[str, list[int]] = {}  # running requests' outputs
        self.done: dict[str, list[int]] = {}
        self.logits: list[torch.Tensor] = []  # per step: (sampled rows, vocab) float32 on the CPU
        self.static_steps = 0  # decode steps that took the static-buffer path on the last stage
        self._step = 0

    def run(self, decode_steps_after: int = 5) -> dict[str, list[int]]:
        """Every request's greedy outputs."""
        self.step(new=["a", "b", "c"])
        for _ in range(3):
            self.step()
        self.step(new=["d"], finished=["b"])
        for _ in range(decode_steps_after):
            self.step()
        return {**self.done, **self.tokens}

    def step(self, new: list[str] = (), finished: list[str] = ()) -> None:
        plan = self._plan(list(new), list(finished))
        if self.execute:
            sched = self.states[0].resolve(plan)
            step = self.runners[0].execute(sched, None, self.states[0].batch)
            self.outputs.append(step)
            for req_id, t in step.sampled.items():
                self.tokens.setdefault(req_id, []).append(t)
            return
        out = None
        for runner, states in zip(self.runners, self.states, strict=True):
            sched = states.resolve(plan)
            inp, out = runner.run_model(sched, out, states.batch)
        self.static_steps += inp is None
        rows = out if inp is None or inp.sample_rows is None else out[inp.sample_rows]
        reqs = sched.requests if inp is None else inp.sampled_requests
        logits = self.runners[-1].model.compute_logits(rows).float().cpu()
        self.logits.append(logits)
        for r, t in zip(reqs, logits.argmax(dim=-1).tolist(), strict=True):
            self.tokens.setdefault(r.req_id, []).append(t)

    def _plan(self, new: list[str], finished: list[str]) -> SchedulerOutput:
        self._step += 1
        for f in finished:
            self.done[f] = self.tokens.pop(f)
        running = [r for r in self.tokens if r not in new]
        d = DecodeBatch(running, [self.tokens[r][-1] for r in running],
                        [len(PROMPTS[r]) + len(self.tokens[r]) - 1 for r in running],
                        [len(self.tokens[r]) for r in running])
        entries = []
        for r in new:
            first = "abcd".index(r) * BLOCKS_PER_REQUEST  # disjoint tables, whole from the start
            entries.append(ScheduledRequest(r, PROMPTS[r], 0, list(range(first, first + BLOCKS_PER_REQUEST)),
                                            self.params.get(r, SamplingParams(temperature=0)), samples=True,
                                            prefix_token_ids=[] if self.params.get(r, GREEDY).penalized else None))
        return SchedulerOutput(self._step, 1, entries, finished, d)


def run_scenario(runners: list[ModelRunner], params: dict[str, SamplingParams] | None = None,
                 execute: bool = False) -> tuple[dict[str, list[int]], Scenario]:
    """(every request's outputs, the scenario with its per-step logits or StepOutputs)."""
    with torch.inference_mode():
        scenario = Scenario(runners, params, execute)
        return scenario.run(), scenario


class HostTransfers:
    """Counts calls that bring tensor data to the host: .cpu, .tolist, .item, .numpy, .to(a device), and the
    Python conversions (bool, int, float, index) that read a tensor's value. A dispatch mode cannot see these
    on the CPU, where they are no-ops to the dispatcher."""

    NAMES = ("cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        to = torch.Tensor.to

        def counted_to(t, *args, **kwargs):
            if any(isinstance(a, (str, torch.device)) for a in (*args, *kwargs.values())):
                self.calls.append("to")
            return to(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", counted_to)

    def _counted(self, name, method):
        def counted(t, *args, **kwargs):
            self.calls.append(name)
            return method(t, *args, **kwargs)

        return counted


def placeholder_step(runners, scenario, device: str):
    """The scenario's next decode step (requests a, c, d decoding) on stage 0, run once with its real input ids
    for the tokens expected, then planned again with placeholders and the real ids kept on the device, as async
    scheduling leaves them: (runner, states, the placeholder step resolved, the expected tokens)."""
    from pipeserve.types import PLACEHOLDER
    from pipeserve.worker.sampled_ids import SampledIds

    runner, states = runners[0], scenario.states[0]
    runner.sampled_ids = SampledIds(device)
    plan = scenario._plan([], [])
    real = list(plan.decodes.token_ids)
    with torch.inference_mode():
        expected = runner.execute(states.resolve(plan), None, states.batch).sampled
        rows = torch.from_numpy(states.batch.rows(plan.decodes.req_ids)).to(device)
        runner.sampled_ids.record(rows, torch.tensor(real, device=device))
        plan.decodes.token_ids = [PLACEHOLDER] * len(real)
        return runner, states, states.resolve(plan), expected


def issue_without_sync(runner, sched, batch):
    """Issue a step deferred with CUDA's sync debug mode raising on any synchronisation; its PendingStep."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return runner.execute(sched, None, batch, defer=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
