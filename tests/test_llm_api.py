"""The `LLM` API contract: order, echoes, finish reasons, stops, errors, lifecycle, text, chat, streaming."""

from __future__ import annotations

import os

import pytest
from helpers import tiny_with_tokenizer

from pipeserve import LLM, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, dtype="float32", max_model_len=256, threads_per_worker=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def tok_llm(tmp_path_factory):
    with LLM(tiny_with_tokenizer(tmp_path_factory), dtype="float32", max_model_len=256,
             threads_per_worker=1) as engine:
        yield engine


def ids(n: int, start: int = 10) -> list[int]:
    return [(start + 13 * i) % 300 + 3 for i in range(n)]


def count_steps(llm: LLM, monkeypatch) -> list[int]:
    """Count the steps the executor runs from now on."""
    calls = []
    real = llm.engine.executor.execute

    async def counting(sched, generation=None):
        calls.append(sched.step_id)
        return await real(sched, generation)

    monkeypatch.setattr(llm.engine.executor, "execute", counting)
    return calls


# ---- order, echoes, finish reasons ---------------------------------------------------------------------


def test_outputs_in_input_order(llm):
    prompts = [ids(n, start=s) for n, s in [(200, 1), (3, 2), (50, 3), (1, 4), (120, 5), (17, 6)]]
    params = SamplingParams(max_tokens=6, **GREEDY)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert len(outs) == len(prompts)
    alone = [llm.generate({"prompt_token_ids": p}, params)[0] for p in prompts]
    for p, o, a in zip(prompts, outs, alone, strict=True):
        assert o.prompt_token_ids == p
        assert o.prompt is None
        assert o.finished and o.outputs[0].finished()
        assert o.outputs[0].token_ids == a.outputs[0].token_ids
    assert len({o.request_id for o in outs}) == len(outs)


def test_finish_reason_length_with_ignore_eos(llm):
    for n in (1, 7, 30):
        out = llm.generate({"prompt_token_ids": ids(9)}, SamplingParams(max_tokens=n, **GREEDY))[0].outputs[0]
        assert out.finish_reason == "length" and out.stop_reason is None
        assert len(out.token_ids) == n


def test_max_tokens_none_fills_max_model_len(llm):
    out = llm.generate({"prompt_token_ids": ids(240)}, SamplingParams(max_tokens=None, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 16 and out.finish_reason == "length"


def test_stop_token_ids_stop_at_first_occurrence(llm):
    prompt = {"prompt_token_ids": ids(12, start=40)}
    full = llm.generate(prompt, SamplingParams(max_tokens=12, **GREEDY))[0].outputs[0].token_ids
    stop_id = full[2]
    first = full.index(stop_id)
    out = llm.generate(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id], **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_id
    assert out.token_ids == full[: first + 1]


def test_min_tokens_delays_stop_token(llm):
    prompt = {"prompt_token_ids": ids(12, start=40)}
    full = llm.generate(prompt, SamplingParams(max_tokens=12, **GREEDY))[0].outputs[0].token_ids
    stop_id = full[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id], min_tokens=3,
                                              **GREEDY))[0].outputs[0]
    assert len(out.token_ids) >= 3 and stop_id not in out.token_ids[:3]
    assert out.finish_reason == "length" or (out.finish_reason == "stop" and out.token_ids[-1] == stop_id)


# ---- errors before any work ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, params, match", [
    ([{"prompt_token_ids": []}], None, "empty"),
    ([{"prompt_token_ids": ids(4)}, {"prompt_token_ids": []}], None, "prompt 1: prompt must not be empty"),
    ([{"prompt_token_ids": ids(250)}], SamplingParams(max_tokens=10), "max_model_len"),
    ([{"prompt_token_ids": ids(256)}], SamplingParams(max_tokens=None), "max_model_len"),
    ([{"prompt_token_ids": [5, 320]}], None, r"\[0, 320\)"),
    ([{"prompt_token_ids": [5, -1]}], None, r"\[0, 320\)"),
    (["hello"], None, "tokenizer"),
    ([{"prompt": "hello"}], None, "tokenizer"),
    ([{"prompt_token_ids": ids(3)}] * 2, [SamplingParams()] * 3, "2 prompts but 3 SamplingParams"),
    ([{"prompt_token_ids": ids(3)}] * 2, [SamplingParams()], "2 prompts but 1 SamplingParams"),
    ([42], None, "prompt"),
    ([{"prompt_token_ids": ids(3)}], SamplingParams(stop=["s"] * 65), r"65 strings.*\(--max-stop-strings\)"),
    ([{"prompt_token_ids": ids(3)}], SamplingParams(stop=["s" * 1025]), r"1025 characters.*--max-stop-string-length"),
])
def test_bad_requests_raise_before_any_work(llm, monkeypatch, prompts, params, match):
    steps = count_steps(llm, monkeypatch)
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params)
    assert steps == []
    assert not llm.engine.has_unfinished() and not any(llm.engine.bookkeeping().values())
    # the engine still works afterwards
    out = llm.generate({"prompt_token_ids": ids(3)}, SamplingParams(max_tokens=2, **GREEDY))
    assert len(out[0].outputs[0].token_ids) == 2 and steps


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(logprobs=21), "logprobs"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(stop=["ok", ""]), "stop"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_path_raises_value_error():
    with pytest.raises(ValueError, match="/nonexistent/model"):
        LLM("/nonexistent/model")


def test_folder_without_config_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_unknown_kwarg_raises_type_error(tiny_model):
    with pytest.raises(TypeError, match="not_an_engine_arg"):
        LLM(tiny_model, not_an_engine_arg=1)


def test_bad_engine_arg_raises_value_error(tiny_model):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, max_model_len=100_000, threads_per_worker=1)


def test_chat_without_tokenizer_raises(llm):
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


# ---- lifecycle -----------------------------------------------------------------------------------------


def test_context_manager_and_double_shutdown(tiny_model):
    with LLM(tiny_model, dtype="float32", max_model_len=64, threads_per_worker=1) as engine:
        assert isinstance(engine, LLM)
        out = engine.generate({"prompt_token_ids": ids(4)}, SamplingParams(max_tokens=3, **GREEDY))
        assert len(out[0].outputs[0].token_ids) == 3
    engine.shutdown()
    engine.shutdown()


def test_shutdown_twice_without_context_manager(tiny_model):
    engine = LLM(tiny_model, dtype="float32", max_model_len=64, threads_per_worker=1)
    engine.shutdown()
    engine.shutdown()


# ---- text, stop strings, chat, streaming (a model with a tokenizer) ------------------------------------


TEXT_PROMPTS = ["Hello world", "The capital of France is", "def fibonacci(n):"]


def test_text_prompts(tok_llm):
    tok = tok_llm.get_tokenizer()
    assert tok is not None and len(tok) == 49152
    outs = tok_llm.generate(TEXT_PROMPTS, SamplingParams(max_tokens=5, **GREEDY))
    for text, o in zip(TEXT_PROMPTS, outs, strict=True):
        assert o.prompt == text
        assert o.prompt_token_ids == tok.encode(text)
        assert len(o.outputs[0].token_ids) == 5 and o.outputs[0].text


def test_text_equals_decode_of_tokens(tok_llm):
    tok = tok_llm.get_tokenizer()
    params = [SamplingParams(max_tokens=24, **GREEDY), SamplingParams(max_tokens=24, temperature=1.0, seed=3,
                                                                      ignore_eos=True)]
    for p in params:
        for o in tok_llm.generate(TEXT_PROMPTS, p):
            c = o.outputs[0]
            assert c.finish_reason == "length"
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def _greedy_text(tok_llm, prompt: str, max_tokens: int):
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))[0].outputs[0]
    assert out.finish_reason == "length"
    return out


def _stop_from_middle(text: str) -> str:
    """A short substring near the middle of `text` with a visible character in it."""
    for mid in range(len(text) // 2, len(text) - 4):
        s = text[mid : mid + 4]
        if s.strip() and "\ufffd" not in s:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_stop_string_cuts_text(tok_llm, prompt):
    tok = tok_llm.get_tokenizer()
    full = _greedy_text(tok_llm, prompt, 24)
    stop = _stop_from_middle(full.text)
    cut = full.text.find(stop)
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=24, stop=["never-appears-xyz", stop],
                                                  **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == full.text[:cut]
    # generation ended on the token that completed the stop string
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(out.token_ids[:-1], skip_special_tokens=True)


def test_stop_string_not_in_output_runs_to_length(tok_llm):
    full = _greedy_text(tok_llm, TEXT_PROMPTS[0], 12)
    out = tok_llm.generate(TEXT_PROMPTS[0], SamplingParams(max_tokens=12, stop="never-appears-xyz",
                                                           **GREEDY))[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None and out.text == full.text


@pytest.fixture(scope="module")
def last_token_stop(tok_llm):
    """(prompt, n, stop): a greedy run of n tokens whose last token alone completes `stop`, seen nowhere earlier."""
    tok = tok_llm.get_tokenizer()
    for prompt in TEXT_PROMPTS:
        full = _greedy_text(tok_llm, prompt, 24)
        for n in range(3, 25):
            before = tok.decode(full.token_ids[: n - 1], skip_special_tokens=True)
            text = tok.decode(full.token_ids[:n], skip_special_tokens=True)
            stop = text[len(before):].strip()
            if len(stop) >= 2 and "\ufffd" not in text and text.find(stop) == len(text.rstrip()) - len(stop):
                return prompt, n, stop, text
    raise AssertionError("no greedy output ends on a fresh token")


def test_stop_string_completed_by_the_last_allowed_token(tok_llm, last_token_stop):
    prompt, n, stop, text = last_token_stop
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=n, stop=stop, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == n
    assert stop not in out.text  # SamplingParams: `stop` strings are cut from the returned text
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_string_completed_one_token_before_the_limit(tok_llm, last_token_stop):
    prompt, n, stop, text = last_token_stop  # same stop, one more token allowed: the stop check runs
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=n + 1, stop=stop, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == n
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_a_stop_list_at_the_limits_still_stops(tok_llm, last_token_stop):
    prompt, n, stop, text = last_token_stop
    never = [f"never-{i:03d}".ljust(1024, "~") for i in range(63)]  # 63 strings of 1,024 characters, not in the text
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=n, stop=never + [stop], **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == text[: text.find(stop)]


def test_stop_limits_are_engine_settings(tiny_model):
    with LLM(tiny_model, dtype="float32", max_model_len=64, threads_per_worker=1, max_stop_strings=100,
             max_stop_string_length=2000) as llm:
        params = SamplingParams(max_tokens=2, stop=["s" * 2000] * 100, **GREEDY)
        assert len(llm.generate({"prompt_token_ids": ids(3)}, params)[0].outputs[0].token_ids) == 2
        with pytest.raises(ValueError, match=r"101 strings.*limit of 100"):
            llm.generate({"prompt_token_ids": ids(3)}, SamplingParams(stop=["s"] * 101))
        with pytest.raises(ValueError, match=r"2001 characters.*limit of 2000"):
            llm.generate({"prompt_token_ids": ids(3)}, SamplingParams(stop=["s" * 2001]))
    with pytest.raises(ValueError, match="max_stop_strings must be >= 1"):
        LLM(tiny_model, max_stop_strings=0)


@pytest.fixture(scope="module")
def stop_token_case(tok_llm):
    """(prompt, stop_id, greedy token ids): a visible token that first appears after a few others."""
    tok = tok_llm.get_tokenizer()
    for prompt in TEXT_PROMPTS:
        full = _greedy_text(tok_llm, prompt, 12).token_ids
        for i in range(2, 12):
            if full.index(full[i]) == i and tok.decode([full[i]], skip_special_tokens=True).strip():
                return prompt, full[i], full
    raise AssertionError("no usable stop token")


def test_stop_token_text_is_not_in_output_text(tok_llm, stop_token_case):
    tok = tok_llm.get_tokenizer()
    prompt, stop_id, full = stop_token_case
    first = full.index(stop_id)
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id], **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full[: first + 1]
    assert out.text == tok.decode(full[:first], skip_special_tokens=True)


def test_chat(tok_llm):
    tok = tok_llm.get_tokenizer()
    assert tok.chat_template
    conv = [{"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=5, **GREEDY)
    out = tok_llm.chat(conv, params)
    assert len(out) == 1
    expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out[0].prompt == expected and "hi" in expected
    assert out[0].prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    assert len(out[0].outputs[0].token_ids) == 5
    two = tok_llm.chat([conv, [{"role": "user", "content": "a much longer question about rivers?"}]], params)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert "rivers" in two[1].prompt
    with pytest.raises(ValueError, match="empty"):
        tok_llm.chat([])


def test_streaming_callback(tok_llm):
    seen: dict[int, list] = {0: [], 1: []}

    def cb(i, out):
        seen[i].append((out.outputs[0].text, list(out.outputs[0].token_ids), out.finished))

    outs = tok_llm.generate(TEXT_PROMPTS[:2], [SamplingParams(max_tokens=8, **GREEDY),
                                               SamplingParams(max_tokens=5, **GREEDY)], on_output=cb)
    for i, n in ((0, 8), (1, 5)):
        calls = seen[i]
        assert len(calls) == n  # one output per token
        assert [f for _, _, f in calls] == [False] * (n - 1) + [True]
        for (t0, ids0, _), (t1, ids1, _) in zip(calls, calls[1:], strict=False):
            assert t1.startswith(t0) and ids1[: len(ids0)] == ids0 and len(ids1) == len(ids0) + 1
        assert len(calls[-1][0]) > len(calls[0][0])
        assert calls[-1][0] == outs[i].outputs[0].text
        assert calls[-1][1] == outs[i].outputs[0].token_ids


def test_tiny_with_tokenizer_folder_is_complete(tmp_path_factory):
    folder = tiny_with_tokenizer(tmp_path_factory)
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert os.path.isfile(os.path.join(folder, "tokenizer.json")) or os.path.isfile(
        os.path.join(folder, "tokenizer_config.json"))


@pytest.fixture(scope="module")
def straddling_stop(tok_llm):
    """(prompt, stop): a stop string whose first half ends one token's text and second half starts the next's."""
    tok = tok_llm.get_tokenizer()
    for prompt in TEXT_PROMPTS:
        full = _greedy_text(tok_llm, prompt, 24)
        for k in range(2, 23):
            a = tok.decode(full.token_ids[:k], skip_special_tokens=True)
            b = tok.decode(full.token_ids[: k + 1], skip_special_tokens=True)
            if "\ufffd" in b or len(a) < 2 or len(b) < len(a) + 2 or not b.startswith(a):
                continue
            stop = b[len(a) - 2 : len(a) + 2]
            if stop.strip() and b.find(stop) == len(a) - 2:
                return prompt, stop
    raise AssertionError("no stop string straddles two tokens")


def test_streamed_text_never_shrinks_with_stop_strings(tok_llm, straddling_stop):
    prompt, stop = straddling_stop
    texts: list[str] = []
    outs = tok_llm.generate(prompt, SamplingParams(max_tokens=24, stop=stop, **GREEDY),
                            on_output=lambda i, o: texts.append(o.outputs[0].text))
    final = outs[0].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    for t in texts:  # what a streaming client has printed must stay a prefix of the final text
        assert final.text.startswith(t), (t, final.text)


def test_stop_string_straddling_two_tokens_is_found(tok_llm, straddling_stop):
    prompt, stop = straddling_stop
    full = _greedy_text(tok_llm, prompt, 24)
    out = tok_llm.generate(prompt, SamplingParams(max_tokens=24, stop=stop, **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]


def test_callback_error_propagates_and_engine_recovers(llm):
    class Boom(RuntimeError):
        pass

    def cb(i, out):
        if i == 1:
            raise Boom("client went away")

    prompts = [{"prompt_token_ids": ids(5, start=s)} for s in range(3)]
    with pytest.raises(Boom):
        llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY), on_output=cb)
    assert not llm.engine.has_unfinished()
    assert llm.engine.stats()[0].used_blocks == 0
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6, 6]
