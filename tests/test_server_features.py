"""What a vLLM user expects of the server, through the official `openai` client (in-process app, tiny model
with SmolLM2's tokenizer): n choices, echo (with prompt logprobs), logit_bias and penalties,
return_tokens_as_token_ids, /tokenize and /detokenize."""

from __future__ import annotations

import json
import re

import openai
import pytest
from fastapi.testclient import TestClient
from helpers import tiny_with_tokenizer
from transformers import AutoTokenizer

from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
from pipeserve.entrypoints.openai.launcher import build_engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tiny_with_tokenizer(tmp_path_factory)
    engine = build_engine(EngineArgs(path, dtype="float32", max_model_len=256, num_kv_blocks=64,
                                     threads_per_worker=1))
    with TestClient(build_app(engine, ServeSettings(served_model_names=["tiny"]))) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
        yield http, client, AutoTokenizer.from_pretrained(path)


def test_n_choices_seeded_apart_for_several_prompts(served):
    _, client, _ = served
    r = client.completions.create(model="tiny", prompt=["Hello there", "A river"], n=2, max_tokens=5,
                                  temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text and r.usage.completion_tokens == 20
    again = client.completions.create(model="tiny", prompt="A river", n=2, max_tokens=5, temperature=1.0, seed=3,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices[2:]]


def test_n_choices_stream_in_chat(served):
    _, client, _ = served
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                            max_tokens=4, temperature=1.0, seed=1, stream=True,
                                            extra_body={"ignore_eos": True})
    texts, finished = ["", "", ""], set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                           max_tokens=4, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    assert finished == {0, 1, 2} and texts == [c.message.content for c in whole.choices]


def test_echo_returns_the_prompt_and_its_logprobs(served):
    _, client, tok = served
    prompt = "The capital of France is"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                  extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == prompt + plain.choices[0].text
    n_prompt = len(tok.encode(prompt))
    assert len(c.logprobs.tokens) == n_prompt + 3
    assert c.logprobs.token_logprobs[0] is None and all(x <= 0 for x in c.logprobs.token_logprobs[1:])
    assert "".join(c.logprobs.tokens[:n_prompt]) == prompt
    ids = client.completions.create(model="tiny", prompt=tok.encode(prompt), max_tokens=1, echo=True)
    assert ids.choices[0].text.startswith(prompt)  # a token-id prompt is echoed as text


def test_return_tokens_as_token_ids(served):
    http, client, _ = served
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    tokens = r.choices[0].logprobs.tokens
    assert all(re.fullmatch(r"token_id:\d+", t) for t in tokens)
    ids = [int(t.split(":")[1]) for t in tokens]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == r.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"return_tokens_as_token_ids": True})
    assert all(t.token.startswith("token_id:") for t in chat.choices[0].logprobs.content)


def test_logit_bias_and_penalties(served):
    _, client, tok = served
    forced = tok.encode(" river")[0]
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == " river" * 4
    plain = client.completions.create(model="tiny", prompt="go go go go", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    penalized = client.completions.create(model="tiny", prompt="go go go go", max_tokens=8, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    assert penalized.choices[0].text != plain.choices[0].text


def test_prefix_cache_through_the_client(served):
    _, client, _ = served
    prompt = "You are a careful assistant. " * 12
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "a"})
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "a"})
    other = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"cache_salt": "b"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_unsupported_fields_are_clear_errors(served):
    _, client, _ = served
    for kwargs, param in ((dict(suffix="end"), "suffix"), (dict(best_of=3), "best_of")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, **kwargs)
        assert err.value.body["param"] == param


def test_tokenize_and_detokenize(served):
    http, _, tok = served
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    for path, body, param in (("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                              ("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"),
                              ("/tokenize", {"prompt": "a", "model": "gpt-9"}, "model")):
        bad = http.post(path, json=body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, (body, bad.text)
    assert json.loads(http.post("/tokenize", content=b"{", headers={"Content-Type": "application/json"}).text)[
        "error"]["type"] == "invalid_request_error"
