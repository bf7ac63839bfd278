"""Checkpoint loading: sharded safetensors folders, and tensor-parallel ranks reading only their shard."""

from __future__ import annotations

import os

import torch
from helpers import make_tiny_llama
from transformers import LlamaForCausalLM as HFLlama

from pipeserve import LLM, SamplingParams
from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.distributed.stage import StageInfo
from pipeserve.loader.model_config import load_model_config
from pipeserve.models.llama import LlamaForCausalLM


def test_sharded_safetensors_with_index_load_like_one_file(tmp_path, tiny_model):
    sharded = str(tmp_path / "sharded")
    HFLlama.from_pretrained(tiny_model).save_pretrained(sharded, max_shard_size="100KB")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 1 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = []
    for path in (tiny_model, sharded):
        with LLM(path, dtype="float32", max_model_len=128, threads_per_worker=1) as llm:
            outs.append(llm.generate([{"prompt_token_ids": list(range(3, 30))}], params)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]


class RecordingTensor:
    """A lazy checkpoint tensor that remembers how much of it was read."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.read = t, t.shape, 0

    def __getitem__(self, index) -> torch.Tensor:
        part = self.t[index]
        self.read += part.numel()
        return part

    def materialize(self) -> torch.Tensor:
        self.read += self.t.numel()
        return self.t


def test_tensor_parallel_rank_reads_only_its_shard(tmp_path):
    path = make_tiny_llama(str(tmp_path / "m"), num_attention_heads=4, num_key_value_heads=2)
    cfg = load_model_config(path, "float32")
    state = HFLlama.from_pretrained(path).state_dict()
    model = LlamaForCausalLM(cfg, StageInfo.whole_model(cfg.num_hidden_layers), 64, TPGroup(rank=1, size=2))
    tensors = {name: RecordingTensor(t) for name, t in state.items()}
    model.load_weights(tensors.items())
    for name, t in tensors.items():
        replicated = "norm" in name  # RMSNorm weights are whole on every rank
        expected = t.t.numel() if replicated else t.t.numel() // 2
        assert t.read == expected, f"{name}: read {t.read} of {t.t.numel()} elements"
