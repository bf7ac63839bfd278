"""Shared test helpers: tiny random Llama checkpoints and the HF reference they are checked against, and fake
steps for driving a scheduler or engine without a model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeserve.config import ModelConfig
from pipeserve.engine.scheduler import Scheduler
from pipeserve.types import SchedulerOutput, StepOutput

# Ties: in a random model two logits can agree to within float rounding, and then any engine (HF included)
# may pick either. A mismatch is accepted only when HF's own logits put our token within this margin of
# HF's choice; comparison of that sequence stops there, since the continuations legitimately differ.
NEAR_TIE = 1e-4

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def make_tiny_llama(folder: str, seed: int = 0, **overrides: Any) -> str:
    """Save a random LlamaForCausalLM (safetensors) with TINY's shape, changed by `overrides`."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # random biases and norms, so those code paths change the output
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation of one prompt (no padding, so nothing to second-guess)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def assert_greedy_match(model: LlamaForCausalLM, prompt: list[int], ours: list[int], expected: list[int],
                        near_tie: float = NEAR_TIE) -> None:
    """Token-for-token equality, except past a near-tie in HF's own logits (see NEAR_TIE)."""
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        if a == b:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + expected[:i]], device=model.device)).logits[0, -1].float()
        gap = (logits[b] - logits[a]).abs().item()
        assert gap < near_tie, f"token {i}: ours {a}, HF {b}, HF logit gap {gap:.3g} is not a tie"
        return


def assert_sampled_match(model: LlamaForCausalLM, prompt: list[int], params, ours: list[int], expected: list[int],
                         near_tie: float = NEAR_TIE) -> None:
    """`assert_greedy_match` for any SamplingParams: a seeded draw is an exponential race over the
    probabilities, so the first differing token is accepted when, in HF's logits, adding `near_tie` to
    either token's logit makes the same seeded draw pick that token."""
    if params.greedy:
        assert_greedy_match(model, prompt, ours, expected, near_tie)
        return
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        if a == b:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + expected[:i]], device=model.device)).logits[0, -1:]  # (1, V)
        picks = [_seeded_draw(logits.float().cpu(), params, i, favoured, near_tie) for favoured in (a, b)]
        assert picks == [a, b], f"token {i}: ours {a}, expected {b}: not a near-tie of the seeded draw"
        return


def _seeded_draw(logits: torch.Tensor, params, index: int, favoured: int, bias: float = NEAR_TIE) -> int:
    """The token pipeserve's sampler draws from `logits` (1, V) as output `index`, with `bias` added to one."""
    from pipeserve.layers.sampler import Sampler

    biased = dataclasses.replace(params, logit_bias={**(params.logit_bias or {}), favoured: bias})
    return Sampler(0, ())(logits, [biased], [index])[0].token_id


def hf_embedded_model() -> LlamaForCausalLM:
    """HF transformers' float32 model of the embedded SmolLM2-135M, read from the same GGUF file."""
    from transformers import AutoModelForCausalLM

    from pipeserve.loader.default_model import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def dequantized_hf(hf_model: LlamaForCausalLM, method: str) -> LlamaForCausalLM:
    """A copy of the HF model whose matmul weights are the values pipeserve's `method` kernels multiply by."""
    from pipeserve.layers.quantization import QuantizedWeight

    model = copy.deepcopy(hf_model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            values = QuantizedWeight(method, module.weight.data, module.weight.device).take_dequantized()
            # A new parameter: a tied head must not change the embedding it shares.
            module.weight = torch.nn.Parameter(values.to(module.weight.device), requires_grad=False)
    return model


def tiny_with_tokenizer(tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (vocab 49152, chat template), built once per session."""
    folder = tmp_path_factory.getbasetemp() / "tiny_with_tokenizer"
    if not (folder / "READY").exists():  # another test file of this session may have built it already
        from pipeserve.loader.default_model import default_model_path
        from pipeserve.loader.gguf_loader import load_gguf_tokenizer

        tok = load_gguf_tokenizer(default_model_path())
        make_tiny_llama(str(folder), vocab_size=49152, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        tok.save_pretrained(str(folder))
        (folder / "READY").write_text("ok")
    return str(folder)


def leftover_bookkeeping(engine) -> dict[str, int]:
    """The per-request structures of `engine` and its stages that are not empty (`AsyncEngine.bookkeeping`;
    asks the stage processes, so call while no step is in flight)."""
    return {name: n for name, n in engine.bookkeeping(stages=True).items() if n}


# ---- engine tests without a model ------------------------------------------------------------------------

# A ModelConfig for an engine driven by a fake executor: nothing is loaded, only its sizes are read.
FAKE_MODEL = ModelConfig(path="fake", vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5,
                         rope_theta=1e4, rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_ids=(),
                         dtype=torch.float32)


def sampling_req_ids(sched: SchedulerOutput) -> list[str]:
    """The requests a plan samples a token for: every columnar decode, and the entries marked `samples`."""
    return list(sched.decodes.req_ids) + [r.req_id for r in sched.requests if r.samples]


def fake_step(sched: SchedulerOutput, token: int = 7) -> StepOutput:
    """What a model would return: `token` for each request that samples this step."""
    return StepOutput(sched.step_id, sched.virtual_engine, dict.fromkeys(sampling_req_ids(sched), token))


def run_to_completion(s: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    """Plan and apply fake steps until the scheduler has no work; returns the plans."""
    steps = []
    while s.has_work():
        out = s.schedule()
        steps.append(out)
        s.update(fake_step(out))
        assert len(steps) < max_steps, "scheduler made no progress"
    return steps


def rank_pid(parent_pid: int, rank: int) -> int:
    """The stage process of `rank` among `parent_pid`'s children (forked or spawned, each names itself)."""
    from server_utils import child_pids

    for pid in child_pids(parent_pid):
        with contextlib.suppress(OSError):  # a child that has just exited
            if Path(f"/proc/{pid}/comm").read_text().strip() == f"pipeserve-r{rank}":
                return pid
    raise AssertionError(f"no process of rank {rank} under pid {parent_pid}")
