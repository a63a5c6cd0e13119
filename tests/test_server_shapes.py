"""Stream, usage and model shapes as OpenAI and vLLM give them (issue 30, finding 8 / build item 5):
`finish_reason` and `logprobs` null until a choice ends, usage in a last chunk of its own, an
`x-request-id` on every answer, HEAD on GET routes, `max_model_len`, `/tokenize` and
`/detokenize`, and an assistant message with `refusal: null` taken back."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import MODEL, post, serve_in_thread, tiny_dir  # noqa: E402, F401

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Name three primary colors."}]
KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def lm(tiny_dir):
    import aded

    return aded.load(str(tiny_dir), drafter="pld", budget="off")


@pytest.fixture(scope="module")
def url(lm):
    from aded.server.app import ServerConfig, create_app

    with serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL))) as base:
        yield base


def _body(path: str, **fields) -> dict:
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "def f(x):"}
    return {"model": MODEL, **prompt, "temperature": 0, "max_tokens": 8, **fields}


def _chunks(url: str, path: str, headers: dict | None = None, **fields) -> list[dict]:
    with httpx.stream("POST", url + path, json={**_body(path, **fields), "stream": True}, timeout=60,
                      headers=headers or {}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


ENDPOINTS = pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])


# ---------------------------------------------------------------------------- streams
@ENDPOINTS
def test_stream_chunks_carry_null_finish_reason_and_logprobs_until_the_end(url, path):
    chunks = _chunks(url, path)
    choices = [c["choices"][0] for c in chunks]
    assert all("finish_reason" in c and "logprobs" in c and c["logprobs"] is None for c in choices)
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == "length"
    assert all(c["index"] == 0 for c in choices)
    if path == CHAT:
        assert choices[0]["delta"] == {"role": "assistant", "content": ""} and choices[-1]["delta"] == {}


@ENDPOINTS
def test_streamed_usage_comes_in_a_last_chunk_without_choices(url, path):
    """The audit: streamed completions put usage in the last choice chunk (OpenAI and vLLM send a
    chunk of its own, `choices: []`)."""
    chunks = _chunks(url, path, stream_options={"include_usage": True})
    *rest, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 8
    assert all(c["choices"] and "usage" not in c for c in rest)
    assert all("usage" not in c for c in _chunks(url, path))


@ENDPOINTS
def test_the_openai_client_reads_the_usage_chunk(url, path):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    if path == CHAT:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    else:
        stream = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    assert all(c.usage is None for c in chunks[:-1])


# ---------------------------------------------------------------------------- request ids
def test_every_answer_has_an_x_request_id_and_a_clients_own_is_echoed(url):
    mine = post(url, CHAT, _body(CHAT), headers={"x-request-id": "trace-42.a:b"})
    assert mine.headers["x-request-id"] == "trace-42.a:b" and mine.json()["id"] == "chatcmpl-trace-42.a:b"
    generated = post(url, COMPLETIONS, _body(COMPLETIONS))
    rid = generated.headers["x-request-id"]
    assert len(rid) == 32 and generated.json()["id"] == f"cmpl-{rid}"
    assert post(url, COMPLETIONS, _body(COMPLETIONS)).headers["x-request-id"] != rid
    with httpx.stream("POST", url + CHAT, json={**_body(CHAT), "stream": True}, timeout=60,
                      headers={"X-Request-Id": "s-1"}) as response:
        assert response.headers["x-request-id"] == "s-1"
        assert all(json.loads(line[6:])["id"] == "chatcmpl-s-1" for line in response.iter_lines()
                   if line.startswith("data: {"))
    # refusals too, and a header that is not a usable id is replaced
    assert post(url, CHAT, {"model": "gpt-9", "messages": MESSAGES}, headers={"x-request-id": "e-1"}).headers[
        "x-request-id"] == "e-1"
    assert httpx.get(url + "/nowhere", headers={"x-request-id": "has space"}).headers["x-request-id"] != "has space"


def test_request_ids_come_before_the_guard(lm):
    from aded.server.app import ServerConfig, create_app

    with serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, api_keys=KEYS))) as base:
        refused = post(base, CHAT, _body(CHAT), headers={"x-request-id": "no-key"})
        assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key"


# ---------------------------------------------------------------------------- HEAD, models
@pytest.mark.parametrize("route", ["/health", "/v1/models", f"/v1/models/{MODEL}", "/metrics"])
def test_head_on_a_get_route_answers_200_without_a_body(url, route):
    head = httpx.head(url + route, timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == httpx.get(url + route, timeout=30).headers["content-type"]


def test_models_give_max_model_len(url, lm):
    listed = httpx.get(url + "/v1/models").json()["data"]
    assert [m["max_model_len"] for m in listed] == [lm.context_length]
    assert httpx.get(url + f"/v1/models/{MODEL}").json()["max_model_len"] == lm.context_length
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == lm.context_length


# ---------------------------------------------------------------------------- /tokenize, /detokenize
def test_tokenize_and_detokenize_as_vllm(url, lm):
    text = post(url, "/tokenize", {"model": MODEL, "prompt": "Hello there"}).json()
    expected = lm.tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    assert text == {"tokens": expected, "count": len(expected), "max_model_len": lm.context_length,
                    "token_strs": None}
    bare = post(url, "/tokenize", {"prompt": "Hello there", "add_special_tokens": False,
                                   "return_token_strs": True}).json()
    assert bare["tokens"] == lm.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] == list("Hello there")
    chat = post(url, "/tokenize", {"model": MODEL, "messages": MESSAGES}).json()
    assert chat["tokens"] == lm.prompt_ids(MESSAGES)  # what a chat completion's prompt is
    served = post(url, CHAT, _body(CHAT)).json()
    assert served["usage"]["prompt_tokens"] == chat["count"]
    back = post(url, "/detokenize", {"model": MODEL, "tokens": expected}).json()
    assert back == {"prompt": lm.tokenizer.decode(expected)}
    assert back["prompt"].endswith("Hello there")


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-9", "prompt": "x"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"prompt": "x", "messages": MESSAGES}, "prompt"),
    ({"prompt": "x", "colour": 1}, "colour"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
])
def test_tokenize_refuses_bad_bodies_by_name(url, body, param):
    response = post(url, "/tokenize", body)
    assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


def test_detokenize_refuses_ids_outside_the_vocabulary(url, lm):
    response = post(url, "/detokenize", {"tokens": [lm.vocab_size]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


def test_tokenize_needs_a_key_where_keys_are_set(lm):
    from aded.server.app import ServerConfig, create_app

    with serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, api_keys=KEYS))) as base:
        for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})):
            assert post(base, route, body).status_code == 401
            assert post(base, route, body, headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200


# ---------------------------------------------------------------------------- messages sent back
def test_an_assistant_message_as_openai_returns_it_is_taken_back(url):
    """OpenAI's response message carries `refusal: null` (and `annotations: []`); a client sends it
    back as it came."""
    first = post(url, CHAT, _body(CHAT)).json()["choices"][0]["message"]
    assert first["refusal"] is None
    again = post(url, CHAT, _body(CHAT, messages=MESSAGES + [first, {"role": "user", "content": "More?"}]))
    assert again.status_code == 200, again.text
    refused = {"role": "assistant", "content": None, "refusal": "I cannot help with that."}
    assert post(url, CHAT, _body(CHAT, messages=MESSAGES + [refused, {"role": "user", "content": "Why?"}])
                ).status_code == 200
    wrong = post(url, CHAT, _body(CHAT, messages=[{"role": "user", "content": "x", "refusal": "no"}]))
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "messages.0.refusal"
