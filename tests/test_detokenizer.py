"""Incremental detokenization gives exactly the text of decoding the whole output at once."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeserve.engine.detokenizer import IncrementalDetokenizer
from pipeserve.engine.output_processor import OutputProcessor
from pipeserve.loader.default_model import default_model_path
from pipeserve.loader.tokenizer import load_tokenizer

TEXT = "Héllo wörld — 日本語のテキスト 🙂 done.\n  Spaces   and\ttabs, numbers 12345, émoji 🙂🙃."


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return load_tokenizer(default_model_path())  # SmolLM2's GPT-2-style byte-level BPE


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (Llama 2's leading-space rules), trained here on a few lines."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *bytes_])
    tok.train_from_iterator([TEXT, "hello world spaces numbers and tabs"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


class _Slow:
    """The same tokenizer without its Rust backend: exercises the windowed fallback."""

    def __init__(self, tok):
        self.decode = tok.decode


def incremental(tokenizer, ids: list[int], skip: bool = True) -> str:
    detok = IncrementalDetokenizer(tokenizer, skip)
    deltas = [detok.append(t) for t in ids]
    assert "".join(deltas) == detok.text
    return detok.text


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_incremental_text_equals_a_full_decode(name: str, request) -> None:
    tok = request.getfixturevalue(name)
    ids = tok.encode(TEXT, add_special_tokens=False)
    ids = ids + [tok.eos_token_id] + ids[:5]  # a special token in the middle is skipped, as in a full decode
    full = tok.decode(ids, skip_special_tokens=True)
    assert incremental(tok, ids) == full
    assert incremental(_Slow(tok), ids) == full
    rng = random.Random(0)  # arbitrary ids too: split multi-byte characters, stray byte tokens
    for _ in range(5):
        ids = [rng.randrange(len(tok)) for _ in range(40)]
        assert incremental(tok, ids) == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_output_processor_keeps_a_request_until_it_is_removed(byte_level) -> None:
    """The engine removes a request when it ends (`AsyncEngine._end`), after its listener has read the final
    output: building that output forgets nothing, and `remove` forgets everything."""
    from pipeserve.engine.request import Request, RequestStatus
    from pipeserve.sampling_params import SamplingParams

    outputs = OutputProcessor(byte_level)
    reqs = [Request(f"r{i}", [1, 2], SamplingParams(max_tokens=2), 2) for i in range(50)]
    for req in reqs:
        outputs.add(req)
        req.append_output(1000)
        assert outputs.find_stop_string(req) is None
    for req in reqs[:25]:
        req.finish(RequestStatus.FINISHED_LENGTH)
        first = outputs.output(req)
        assert first.finished and outputs.output(req).outputs[0].text == first.outputs[0].text
    assert outputs.bookkeeping()["detokenizers"] == 50
    for req in reqs:
        outputs.remove(req.request_id)
    assert outputs.bookkeeping() == {"detokenizers": 0, "prompt_logprobs": 0}
