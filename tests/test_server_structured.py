"""Structured output and tools through the server (issue 14): `response_format` on both endpoints,
`tools` / `tool_choice` on chat with `tool_calls` in the message, through the official client.

The server's tiny model has a character tokenizer llguidance cannot read, so these tests save a
tiny random Llama over the default model's byte-level tokenizer (offline), once with its own chat
template (no tools) and once with a Hermes template that renders `tools` and `<tool_call>`."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from server_support import HERMES_TEMPLATE, MODEL, save_byte_level_model, serve_in_thread  # noqa: E402

MESSAGES = [{"role": "user", "content": "Pick a colour."}]
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["colour", "ok"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                                           "required": ["city"], "additionalProperties": False}}}
HERMES = HERMES_TEMPLATE


def _save(folder, template: str | None) -> None:
    save_byte_level_model(folder, template)


def _serve(lm):
    from aded.server.app import ServerConfig, create_app

    return serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, default_max_tokens=48)))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import aded

    folder = tmp_path_factory.mktemp("structured") / "plain"
    _save(folder, None)
    return aded.load(str(folder), drafter="pld", budget="off")


@pytest.fixture(scope="module")
def url(lm):
    with _serve(lm) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_answer_validates_and_equals_the_library(client, lm):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=48,
                                         response_format=RESPONSE_FORMAT)
    answer = json.loads(out.choices[0].message.content)
    assert set(answer) == {"colour", "ok"} and answer["colour"] in SCHEMA["properties"]["colour"]["enum"]
    assert isinstance(answer["ok"], bool) and out.choices[0].finish_reason == "stop"
    direct = lm.generate(MESSAGES, temperature=0, max_new_tokens=48, response_format=RESPONSE_FORMAT)
    assert out.choices[0].message.content == direct.text


def test_json_mode_gives_parseable_json_on_both_endpoints(client, lm):
    """JSON mode (`json_object`), with `max_tokens` enough for the tiny model to close its object."""
    fmt = {"type": "json_object"}
    direct = lm.generate(MESSAGES, temperature=0, max_new_tokens=48, response_format=fmt)
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=48,
                                         response_format=fmt)
    assert out.choices[0].message.content == direct.text
    if direct.finish_reason == "stop":
        assert isinstance(json.loads(direct.text), dict)
    text = client.completions.create(model=MODEL, prompt="JSON:", temperature=0, max_tokens=48,
                                     extra_body={"response_format": RESPONSE_FORMAT})
    assert text.choices[0].text == lm.generate("JSON:", chat=False, temperature=0, max_new_tokens=48,
                                               response_format=RESPONSE_FORMAT).text
    assert set(json.loads(text.choices[0].text)) == {"colour", "ok"}


def test_streamed_json_schema_equals_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=48, response_format=RESPONSE_FORMAT)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
              if c.choices]
    assert "".join(pieces) == whole


@pytest.mark.parametrize("guided", [SCHEMA, json.dumps(SCHEMA)], ids=["object", "string"])
def test_vllm_guided_json_is_a_json_schema_response_format(url, guided):
    """vLLM's `guided_json` (issue 30, finding 5): the schema, as an object or a JSON string."""
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 48}
    guided_reply = httpx.post(url + "/v1/chat/completions", json={**body, "guided_json": guided}, timeout=60)
    schema_reply = httpx.post(url + "/v1/chat/completions", json={**body, "response_format": RESPONSE_FORMAT},
                              timeout=60)
    assert guided_reply.status_code == 200, guided_reply.text
    content = guided_reply.json()["choices"][0]["message"]["content"]
    assert content == schema_reply.json()["choices"][0]["message"]["content"]
    assert set(json.loads(content)) == {"colour", "ok"}


@pytest.mark.parametrize("field, value, param", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}},
     "response_format"),
    ("tools", [WEATHER], "tools"),
    ("tool_choice", "required", "tool_choice"),
    # a schema beside json_object or text would be ignored (issue 30, finding 5)
    ("response_format", {"type": "json_object", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     "response_format.json_schema"),
    ("response_format", {"type": "text", "json_schema": {"name": "x", "schema": {}}}, "response_format.json_schema"),
    ("guided_json", {"type": "object"}, "guided_json"),  # beside the response_format below
])
def test_bad_structured_fields_are_400_naming_the_field(url, field, value, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, field: value}
    if field == "guided_json":
        body["response_format"] = {"type": "json_object"}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if field == "tools":
        assert "no tool support" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def tools_lm(tmp_path_factory):
    import aded

    folder = tmp_path_factory.mktemp("structured") / "hermes"
    _save(folder, HERMES)
    return aded.load(str(folder), drafter="pld", budget="off")


def test_tool_call_round_trip_through_the_client(tools_lm):
    with _serve(tools_lm) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        named = {"type": "function", "function": {"name": "get_weather"}}  # one call (a random model
        # given "required" goes on calling until max_tokens)
        first = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice=named,
                                               temperature=0, max_tokens=160)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
        direct = tools_lm.generate(ask, tools=[WEATHER], tool_choice=named, temperature=0, max_new_tokens=160)
        assert [c["function"] for c in direct.tool_calls] == [c.function.model_dump() for c in choice.message.tool_calls]

        streamed = list(client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER],
                                                       tool_choice=named, temperature=0, max_tokens=160,
                                                       stream=True))
        deltas = [c.choices[0] for c in streamed if c.choices]
        assert "".join(d.delta.content or "" for d in deltas) == ""
        calls = [t for d in deltas for t in d.delta.tool_calls or ()]
        assert [(t.index, t.function.name, t.function.arguments) for t in calls] == \
            [(0, call.function.name, call.function.arguments)]
        assert deltas[-1].finish_reason == "tool_calls"

        back = ask + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
        back[1]["content"] = None
        final = client.chat.completions.create(model=MODEL, messages=back, tools=[WEATHER], tool_choice="none",
                                               temperature=0, max_tokens=8)
        assert final.choices[0].message.tool_calls is None
        assert final.choices[0].message.content == tools_lm.generate(
            back, tools=[WEATHER], tool_choice="none", temperature=0, max_new_tokens=8).text
