"""Malformed requests, table-driven: each gets its status and the `param` naming what is wrong (a path such
as `messages[0].content` for a field inside a message), never a 200 and never a 5xx. The app runs in-process
on a tiny model with a real tokenizer and chat template, so chat requests reach the template."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import tiny_with_tokenizer

from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
from pipeserve.entrypoints.openai.launcher import build_engine

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def user(content):
    return {**CHAT_OK, "messages": [{"role": "user", "content": content}]}


def msg(**fields):
    return {**CHAT_OK, "messages": [fields]}


CASES = [  # (name, path, body (dict or raw bytes), status, param, fragment of the message)
    # the body itself
    ("malformed json", CMPL, b'{"model": "tiny", "prompt": ', 400, None, "JSON"),
    ("body is a list", CMPL, b"[1, 2]", 400, None, "JSON object"),
    ("empty body", CMPL, b"", 400, None, "missing"),
    ("bad utf-8", CMPL, b'{"prompt": "\xff\xfe", "max_tokens": 2}', 400, None, "UTF-8"),
    ("deeply nested json", CMPL, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, "deeply"),
    ("number with 5000 digits", CMPL, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, "digits"),
    ("nan temperature", CMPL, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "finite"),
    # types and ranges of sampling fields
    ("max_tokens a string", CMPL, {**OK, "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("max_tokens a float", CMPL, {**OK, "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("max_tokens negative", CMPL, {**OK, "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ("max_tokens absurd", CMPL, {**OK, "max_tokens": 10**30}, 400, "max_tokens", "less than"),
    ("temperature a string", CMPL, {**OK, "temperature": "hot"}, 400, "temperature", "number"),
    ("temperature a bool", CMPL, {**OK, "temperature": True}, 400, "temperature", "number"),
    ("temperature negative", CMPL, {**OK, "temperature": -1}, 400, "temperature", ">= 0"),
    ("top_p above 1", CMPL, {**OK, "top_p": 5}, 400, "top_p", "(0, 1]"),
    ("top_p zero", CMPL, {**OK, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("top_k below -1", CMPL, {**OK, "top_k": -5}, 400, "top_k", ">= 0"),
    ("min_p above 1", CMPL, {**OK, "min_p": 2}, 400, "min_p", "[0, 1]"),
    ("seed a string", CMPL, {**OK, "seed": "abc"}, 400, "seed", "integer"),
    ("n zero", CMPL, {**OK, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("n too large", CMPL, {**OK, "n": 1000}, 400, "n", "less than or equal to 128"),
    ("presence_penalty above 2", CMPL, {**OK, "presence_penalty": 3}, 400, "presence_penalty", "2"),
    ("frequency_penalty below -2", CMPL, {**OK, "frequency_penalty": -3}, 400, "frequency_penalty", "-2"),
    ("repetition_penalty zero", CMPL, {**OK, "repetition_penalty": 0}, 400, "repetition_penalty", "greater than 0"),
    ("logit_bias key not a token id", CMPL, {**OK, "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ("logit_bias value out of range", CMPL, {**OK, "logit_bias": {"5": 500}}, 400, "logit_bias", "[-100, 100]"),
    ("logit_bias token outside the vocab", CMPL, {**OK, "logit_bias": {"99999999": 1}}, 400, "logit_bias", "[0, "),
    ("logprobs above 20", CMPL, {**OK, "logprobs": 100}, 400, "logprobs", "20"),
    ("logprobs negative", CMPL, {**OK, "logprobs": -1}, 400, "logprobs", "0"),
    ("min_tokens above max_tokens", CMPL, {**OK, "min_tokens": 5}, 400, "min_tokens", "max_tokens"),
    ("stop a number", CMPL, {**OK, "stop": 5}, 400, "stop", "string"),
    ("stop an empty string", CMPL, {**OK, "stop": [""]}, 400, "stop", "non-empty"),
    ("more stop strings than the limit", CMPL, {**OK, "stop": [f"s{i}" for i in range(65)]}, 400, "stop",
     "65 strings, more than this server's limit of 64 (--max-stop-strings)"),
    ("a stop string longer than the limit", CMPL, {**OK, "stop": ["s" * 1025]}, 400, "stop",
     "1025 characters, longer than this server's limit of 1024 (--max-stop-string-length)"),
    ("chat: more stop strings than the limit", CHAT, {**CHAT_OK, "stop": ["s"] * 65}, 400, "stop",
     "--max-stop-strings"),
    ("stop_token_ids outside the vocab", CMPL, {**OK, "stop_token_ids": [10**6]}, 400, "stop_token_ids", "[0, "),
    ("stream a string", CMPL, {**OK, "stream": "yes"}, 400, "stream", "boolean"),
    ("stream_options without stream", CMPL, {**OK, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream"),
    ("cache_salt empty", CMPL, {**OK, "cache_salt": ""}, 400, "cache_salt", "non-empty"),
    ("cache_salt a number", CMPL, {**OK, "cache_salt": 5}, 400, "cache_salt", "string"),
    # completions' own fields
    ("missing prompt", CMPL, {"model": "tiny"}, 400, "prompt", "required"),
    ("empty prompt", CMPL, {**OK, "prompt": ""}, 400, "prompt", "empty"),
    ("empty prompt list", CMPL, {**OK, "prompt": []}, 400, "prompt", "prompt must be"),
    ("float token ids", CMPL, {**OK, "prompt": [1.5, 2]}, 400, "prompt", "prompt must be"),
    ("mixed prompt list", CMPL, {**OK, "prompt": [[1], "a"]}, 400, "prompt", "prompt must be"),
    ("token id outside the vocab", CMPL, {**OK, "prompt": [5, 10**9]}, 400, "prompt", "[0, 49152)"),
    ("prompt longer than the context", CMPL, {**OK, "prompt": [5] * 120, "max_tokens": 20}, 400, "prompt",
     "max_model_len"),
    ("suffix", CMPL, {**OK, "suffix": "end"}, 400, "suffix", "not supported"),
    ("best_of above n", CMPL, {**OK, "best_of": 3}, 400, "best_of", "best_of"),
    ("unknown model", CMPL, {**OK, "model": "gpt-9"}, 404, "model", "gpt-9"),
    # chat: the messages, by role
    ("missing messages", CHAT, {"model": "tiny"}, 400, "messages", "required"),
    ("messages not a list", CHAT, {**CHAT_OK, "messages": "hi"}, 400, "messages", "list"),
    ("empty messages", CHAT, {**CHAT_OK, "messages": []}, 400, "messages", "empty"),
    ("message not an object", CHAT, {**CHAT_OK, "messages": ["hi"]}, 400, "messages[0]", "object"),
    ("message without role", CHAT, msg(content="hi"), 400, "messages[0]", "role"),
    ("unknown role", CHAT, msg(role="wizard", content="hi"), 400, "messages[0]", "wizard"),
    ("user without content", CHAT, msg(role="user"), 400, "messages[0].content", "required"),
    ("user content a number", CHAT, user(5), 400, "messages[0].content", "string"),
    ("user content an empty list", CHAT, user([]), 400, "messages[0].content", "empty"),
    ("system content null", CHAT, msg(role="system", content=None), 400, "messages[0].content", "string"),
    ("assistant without content", CHAT, msg(role="assistant"), 400, "messages[0]", "content"),
    ("assistant with tool_calls", CHAT, msg(role="assistant", tool_calls=[{"id": "1", "type": "function"}]), 400,
     "messages[0]", "tool_calls"),
    ("tool without tool_call_id", CHAT, msg(role="tool", content="42"), 400, "messages[0].tool_call_id",
     "required"),
    ("image part", CHAT, user([{"type": "image_url", "image_url": {"url": "http://x"}}]), 400,
     "messages[0].content[0]", "only text"),
    ("unknown part type", CHAT, user([{"type": "hologram"}]), 400, "messages[0].content[0]", "unknown"),
    ("text part without text", CHAT, user([{"type": "text"}]), 400, "messages[0].content[0]", "text"),
    ("name a number", CHAT, msg(role="user", content="hi", name=7), 400, "messages[0].name", "string"),
    ("second message bad", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "hi"}, {"role": "tool"}]},
     400, "messages[1].content", "required"),
    # chat: other fields
    ("top_logprobs without logprobs", CHAT, {**CHAT_OK, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("top_logprobs above 20", CHAT, {**CHAT_OK, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", "20"),
    ("tools", CHAT, {**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "not supported"),
    ("max_completion_tokens negative", CHAT, {**CHAT_OK, "max_completion_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("n a float", CHAT, {**CHAT_OK, "n": 1.5}, 400, "n", "integer"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = build_engine(EngineArgs(tiny_with_tokenizer(tmp_path_factory), dtype="float32", max_model_len=128,
                                     num_kv_blocks=32, threads_per_worker=1))
    with TestClient(build_app(engine, ServeSettings(served_model_names=["tiny"]))) as client:
        yield client


def test_the_table_is_large():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, path, body, status, param, fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(client, name, path, body, status, param, fragment):
    if isinstance(body, bytes):
        resp = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert fragment in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert client.post(CMPL, json={**OK, "max_tokens": 1}).status_code == 200  # and the server goes on serving


def test_good_requests_of_every_role_still_pass(client):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": [
        {"type": "text", "text": "Answer in English."}]}, {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "refusal": "no"}, {"role": "user", "content": "again"}]
    resp = client.post(CHAT, json={**CHAT_OK, "messages": conversation})
    assert resp.status_code == 200, resp.text
    assert client.post(CMPL, json={**OK, "best_of": 2, "n": 2}).status_code == 200
