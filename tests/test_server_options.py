"""The request fields LangChain, LiteLLM, the OpenAI SDKs and vLLM clients send (issue 30, finding 5
/ build item 4): honoured where they change the output (`n`, `parallel_tool_calls`,
`include_stop_str_in_output`, `skip_special_tokens`, `chat_template_kwargs`, the legacy
`functions`, `prompt_cache_key`), accepted where they cannot (`store`, `metadata`, `service_tier`,
`user`, `reasoning_effort`), refused by name where they conflict or make no sense."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import (  # noqa: E402
    MODEL,
    hermes,  # noqa: F401 (a fixture)
    post,
    scripted_lm,
    serve_in_thread,
    tiny_dir,  # noqa: F401
)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Name three primary colors."}]
EOS = 1  # the tiny model's
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


@pytest.fixture(scope="module")
def lm(tiny_dir):
    import aded

    return aded.load(str(tiny_dir), drafter="pld", budget="off")


def _serve(lm, **fields):
    from aded.server.app import ServerConfig, create_app

    return serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, **fields)))


@pytest.fixture(scope="module")
def url(lm):
    with _serve(lm) as base:
        yield base


def _body(path: str, **fields) -> dict:
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "def f(x):"}
    return {"model": MODEL, **prompt, "temperature": 0, "max_tokens": 8, **fields}


def _served(url: str, path: str, **fields) -> dict:
    response = post(url, path, _body(path, **fields))
    assert response.status_code == 200, response.text
    return response.json()


def _texts(reply: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in reply["choices"]]


def _streamed(url: str, path: str, **fields) -> tuple[dict[int, str], list[dict]]:
    """(text per choice index, the chunks) of a streamed request."""
    with httpx.stream("POST", url + path, json={**_body(path, **fields), "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return texts, chunks


ENDPOINTS = pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])


# ---------------------------------------------------------------------------- n
@ENDPOINTS
def test_n_greedy_gives_n_equal_choices(url, path):
    one = _served(url, path)
    three = _served(url, path, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert _texts(three) == _texts(one) * 3
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    texts, chunks = _streamed(url, path, n=2, stream_options={"include_usage": True})
    assert texts == {0: _texts(one)[0], 1: _texts(one)[0]}
    finishes = [c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2 * 8


def test_n_sampled_gives_each_choice_its_own_seed(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7)
    one = client.chat.completions.create(**kwargs)
    four = client.chat.completions.create(n=4, **kwargs)
    texts = [c.message.content for c in four.choices]
    assert texts[0] == one.choices[0].message.content  # choice 0 keeps the seed: n=1 is unchanged
    assert len(set(texts)) > 1
    assert [c.message.content for c in client.chat.completions.create(n=4, **kwargs).choices] == texts


# ---------------------------------------------------------------------------- output fields
@ENDPOINTS
def test_include_stop_str_in_output_keeps_the_stop_string(url, lm, path):
    plain = _texts(_served(url, path, max_tokens=12))[0]
    stop = plain[4:6]
    cut = plain.find(stop)
    assert _texts(_served(url, path, max_tokens=12, stop=[stop]))[0] == plain[:cut]
    kept = _served(url, path, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert _texts(kept)[0] == plain[:cut + len(stop)] and kept["choices"][0]["finish_reason"] == "stop"
    texts, _ = _streamed(url, path, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert texts[0] == plain[:cut + len(stop)]


@ENDPOINTS
def test_skip_special_tokens_false_writes_special_tokens(url, path):
    forced = {"logit_bias": {str(EOS): 100}, "max_tokens": 3}
    assert _texts(_served(url, path, ignore_eos=True, **forced)) == [""]
    kept = _served(url, path, ignore_eos=True, skip_special_tokens=False, **forced)
    assert _texts(kept) == ["</s></s></s>"] and kept["choices"][0]["finish_reason"] == "length"
    assert _streamed(url, path, ignore_eos=True, skip_special_tokens=False, **forced)[0] == {0: "</s></s></s>"}
    # an EOS that ends the answer is not written, unless asked for (vLLM's rule)
    assert _texts(_served(url, path, skip_special_tokens=False, **forced)) == [""]
    assert _texts(_served(url, path, skip_special_tokens=False, include_stop_str_in_output=True,
                          **forced)) == ["</s>"]
    # logprobs were used to read the ids: they are not sent unless asked for
    assert kept["choices"][0]["logprobs"] is None


def test_chat_template_kwargs_reach_the_template(tiny_dir):
    import aded

    lm = aded.load(str(tiny_dir), drafter="pld", budget="off")
    lm.tokenizer.chat_template = ("{% if shout %}LOUD {% endif %}{% for m in messages %}<{{ m['role'] }}>"
                                  "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with _serve(lm) as base:
        plain = post(base, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
        loud = post(base, "/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"shout": True}}).json()["tokens"]
        assert lm.tokenizer.decode(loud) == "LOUD " + lm.tokenizer.decode(plain)
        reply = _served(base, CHAT, chat_template_kwargs={"shout": True})
        assert reply["usage"]["prompt_tokens"] == len(loud)
        assert _texts(reply)[0] == lm.generate(lm.tokenizer.decode(loud), chat=False, max_new_tokens=8,
                                               temperature=0).text
        refused = post(base, CHAT, _body(CHAT, chat_template_kwargs={"add_generation_prompt": False}))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"


# ---------------------------------------------------------------------------- tools: legacy, parallel
def test_parallel_tool_calls_false_returns_one_call(hermes):
    with _serve(scripted_lm(hermes, TWO_CALLS)) as base:
        ask = {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 80, "temperature": 0}
        both = post(base, CHAT, ask).json()["choices"][0]
        assert [json.loads(c["function"]["arguments"])["city"] for c in both["message"]["tool_calls"]] == \
            ["Paris", "Rome"]
        one = post(base, CHAT, {**ask, "parallel_tool_calls": False}).json()["choices"][0]
        assert [json.loads(c["function"]["arguments"])["city"] for c in one["message"]["tool_calls"]] == ["Paris"]
        assert one["finish_reason"] == "tool_calls" and one["message"]["content"] is None


def test_legacy_functions_are_tools_and_answered_as_function_call(hermes):
    with _serve(scripted_lm(hermes, TWO_CALLS)) as base:
        ask = {"model": MODEL, "messages": MESSAGES, "functions": [WEATHER["function"]], "max_tokens": 80,
               "temperature": 0}
        reply = post(base, CHAT, ask).json()["choices"][0]
        assert reply["finish_reason"] == "function_call" and "tool_calls" not in reply["message"]
        assert reply["message"]["function_call"]["name"] == "get_weather"
        assert json.loads(reply["message"]["function_call"]["arguments"]) == {"city": "Paris"}
        tokens = post(base, "/tokenize", {"messages": MESSAGES, "tools": [WEATHER]}).json()["count"]
        assert post(base, CHAT, ask).json()["usage"]["prompt_tokens"] == tokens  # rendered as tools
        # the call sent back in the legacy shape, and its answer as a function message's content
        back = MESSAGES + [{"role": "assistant", "content": None, "function_call": reply["message"]["function_call"]},
                           {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}]
        assert post(base, CHAT, {**ask, "messages": back}).status_code == 200
        legacy = [*back[:-1], {"role": "function", "name": "get_weather", "content": "sunny"}]
        assert post(base, "/tokenize", {"messages": legacy}).json() == post(base, "/tokenize", {"messages": back}).json()
        assert post(base, CHAT, {**ask, "messages": legacy}).status_code == 200
        nameless = post(base, CHAT, {**ask, "messages": [*back[:-1], {"role": "function", "content": "sunny"}]})
        assert nameless.status_code == 400 and nameless.json()["error"]["param"] == "messages.2.name", nameless.text
        named = post(base, CHAT, {**ask, "function_call": {"name": "get_weather"}}).json()["choices"][0]
        assert named["message"]["function_call"]["name"] == "get_weather"
        for extra, param in (({"tools": [WEATHER]}, "functions"), ({"function_call": "auto", "functions": None},
                                                                      "function_call")):
            refused = post(base, CHAT, {**ask, **extra})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


# ---------------------------------------------------------------------------- prompt_cache_key
def test_prompt_cache_key_is_the_salt_where_state_is_per_salt(tiny_dir, tmp_path):
    import aded

    lm = aded.load(str(tiny_dir), drafter="suffix", budget="off")
    ask = _body(CHAT, max_tokens=30)
    with _serve(lm, state_per="salt", state_path=tmp_path / "state.npz") as base:
        first = post(base, CHAT, {**ask, "prompt_cache_key": "a"}).json()["aded"]["mean_accepted_tokens"]
        again = post(base, CHAT, {**ask, "prompt_cache_key": "a"}).json()["aded"]["mean_accepted_tokens"]
        other = post(base, CHAT, {**ask, "prompt_cache_key": "b"}).json()["aded"]["mean_accepted_tokens"]
        assert again > first and other == first
    with _serve(lm) as base:  # shared state: accepted, changes nothing
        assert _texts(post(base, CHAT, {**ask, "prompt_cache_key": "a"}).json()) == _texts(post(base, CHAT, ask).json())


# ---------------------------------------------------------------------------- accepted and ignored
IGNORED = {"store": True, "metadata": {"run": "42"}, "service_tier": "auto", "user": "u-1",
           "reasoning_effort": "low"}


def test_fields_that_cannot_change_the_output_are_accepted(url):
    plain = _texts(_served(url, CHAT))
    assert _texts(_served(url, CHAT, **IGNORED)) == plain
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                           store=False, metadata={"a": "b"}, service_tier="auto",
                                           reasoning_effort="minimal", user="me", parallel_tool_calls=None)
    assert [reply.choices[0].message.content] == plain


# ---------------------------------------------------------------------------- refused by name
REFUSED = [
    ("repetition_penalty far out", CHAT, {"repetition_penalty": 1e308}, "repetition_penalty"),
    ("repetition_penalty zero", COMPLETIONS, {"repetition_penalty": 0}, "repetition_penalty"),
    ("a tool message without tool_call_id", CHAT,
     {"messages": MESSAGES + [{"role": "tool", "content": "sunny"}]}, "messages.1.tool_call_id"),
    ("json_object with a schema", CHAT,
     {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema"),
    ("guided_json beside response_format", COMPLETIONS,
     {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
    ("n above the limit", COMPLETIONS, {"n": 17}, "n"),
    ("an unknown service_tier", CHAT, {"service_tier": "gold"}, "service_tier"),
]


@pytest.mark.parametrize("label,path,fields,param", REFUSED, ids=[r[0] for r in REFUSED])
def test_conflicting_or_meaningless_fields_are_refused_by_name(url, label, path, fields, param):
    response = post(url, path, _body(path, **fields))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_body_in_another_charset_is_decoded_by_it(url):
    """The audit: `charset=latin-1` was decoded as UTF-8. A known charset is decoded as declared; an
    unknown one is a 415 naming it."""
    body = json.dumps({"prompt": "caf\u00e9 x"}, ensure_ascii=False)
    as_utf8 = post(url, "/tokenize", body.encode("utf-8"))
    as_latin1 = httpx.post(url + "/tokenize", content=body.encode("latin-1"), timeout=30,
                           headers={"Content-Type": "application/json; charset=latin-1"})
    assert as_latin1.status_code == 200 and as_latin1.json() == as_utf8.json()
    assert post(url, "/tokenize", body.encode("latin-1")).status_code == 400  # undeclared: UTF-8
    unknown = httpx.post(url + COMPLETIONS, content=b"{}", timeout=30,
                         headers={"Content-Type": "application/json; charset=klingon"})
    assert unknown.status_code == 415 and unknown.json()["error"]["param"] == "charset"
    assert "klingon" in unknown.json()["error"]["message"]
    wrong = httpx.post(url + COMPLETIONS, content=body.encode("latin-1"), timeout=30,
                       headers={"Content-Type": 'application/json; charset="us-ascii"'})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "charset"
