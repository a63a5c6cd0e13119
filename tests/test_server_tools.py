"""Tool calls through the server (issue 30, finding 7 / build item 6): markup never reaches
`content`, whole or streamed; a reply cut inside a call says so (`finish_reason: "length"`, the
calls completed before the cut); a fenced ```json answer naming a declared tool and matching its
schema is a call (what Qwen2.5-Coder writes). The "model" is a script (tests/scripted.py) over a
byte-level tokenizer with a Hermes template, so each test chooses what it writes; the audit's
`tool_choice: "required"` with `max_tokens: 5` runs on a tiny random model."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from server_support import (  # noqa: E402
    HERMES_TEMPLATE,
    MODEL,
    hermes,  # noqa: F401 (a fixture)
    post,
    save_byte_level_model,
    scripted_lm,
    serve_in_thread,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ASK = {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER], "temperature": 0, "max_tokens": 120}


def _serve(lm):
    from aded.server.app import ServerConfig, create_app

    return serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL)))


def _whole(base: str, **fields) -> dict:
    response = post(base, CHAT, {**ASK, **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _stream(base: str, **fields) -> tuple[str, list[dict], str]:
    """(the content deltas joined, the tool call deltas, the finish reason) of a streamed request."""
    with httpx.stream("POST", base + CHAT, json={**ASK, **fields, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    pieces = [c["delta"].get("content") or "" for c in choices]
    assert not any("tool_call>" in p for p in pieces)  # markup never in a content delta
    calls = [call for c in choices for call in c["delta"].get("tool_calls") or ()]
    return "".join(pieces), calls, choices[-1]["finish_reason"]


def _arguments(calls: list[dict]) -> list[dict]:
    return [json.loads(c["function"]["arguments"]) for c in calls]


# ---------------------------------------------------------------------------- cut inside a call
def test_the_audits_required_call_cut_by_max_tokens_leaks_no_markup(tmp_path):
    """The audit: `tool_choice: "required"` with `max_tokens: 5` returned the raw
    `<tool_call>\\n{"name":` markup as content."""
    import aded

    save_byte_level_model(tmp_path / "hermes", HERMES_TEMPLATE)
    lm = aded.load(str(tmp_path / "hermes"), drafter="pld", budget="off")
    with _serve(lm) as base:
        choice = _whole(base, tool_choice="required", max_tokens=5)
        assert choice["finish_reason"] == "length"
        assert not choice["message"]["content"] and "tool_calls" not in choice["message"]
        content, calls, finish = _stream(base, tool_choice="required", max_tokens=5)
        assert content == "" and calls == [] and finish == "length"


def test_a_reply_cut_inside_its_second_call_gives_the_first_and_length(hermes):
    text = f"Checking.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{CALL}\n</tool_call>"
    cut = len(hermes(text.rsplit("</tool_call>", 1)[0][:-12], add_special_tokens=False)["input_ids"])
    with _serve(scripted_lm(hermes, text)) as base:
        choice = _whole(base, max_tokens=cut)
        assert choice["finish_reason"] == "length"
        assert choice["message"]["content"] == "Checking."
        assert _arguments(choice["message"]["tool_calls"]) == [{"city": "Paris"}]
        content, calls, finish = _stream(base, max_tokens=cut)
        assert content.strip() == "Checking." and _arguments(calls) == [{"city": "Paris"}] and finish == "length"
        whole = _whole(base)
        assert whole["finish_reason"] == "tool_calls" and len(whole["message"]["tool_calls"]) == 2


def test_markup_that_holds_no_call_is_dropped_from_content(hermes):
    text = "Sure.<tool_call>\n{not json}\n</tool_call> Done.</tool_call>"
    with _serve(scripted_lm(hermes, text)) as base:
        choice = _whole(base)
        assert choice["message"]["content"] == "Sure. Done." and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
        content, calls, finish = _stream(base)
        assert "tool_call" not in content and content.replace(" ", "") == "Sure.Done." and calls == []


# ---------------------------------------------------------------------------- fenced JSON calls
def test_a_fenced_json_call_of_a_declared_tool_is_a_call(hermes):
    """The audit: Qwen2.5-Coder-1.5B, with `auto`, answered in a fenced ```json block that came back
    as content with no tool_calls."""
    text = f"Sure:\n```json\n{CALL}\n```"
    with _serve(scripted_lm(hermes, text)) as base:
        choice = _whole(base)
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure:"
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
        assert _arguments(choice["message"]["tool_calls"]) == [{"city": "Paris"}]
        content, calls, finish = _stream(base)
        assert content.strip() == "Sure:" and _arguments(calls) == [{"city": "Paris"}] and finish == "tool_calls"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0)
        assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_the_library_recognises_a_fenced_call_as_the_server_does(hermes):
    """`Aded.generate` parses calls against the declared tools, not their names alone, so a fenced
    call that matches the schema is a call there too, and one that does not stays content."""
    completion = scripted_lm(hermes, f"Sure:\n```json\n{CALL}\n```").generate(MESSAGES, tools=[WEATHER])
    assert completion.finish_reason == "tool_calls" and completion.content == "Sure:"
    assert _arguments(completion.tool_calls) == [{"city": "Paris"}]
    wrong = '```json\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n```'
    completion = scripted_lm(hermes, wrong).generate(MESSAGES, tools=[WEATHER])
    assert not completion.tool_calls and completion.content == wrong


@pytest.mark.parametrize("text", [
    '```json\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n```',  # not the tool's schema
    '```json\n{"name": "get_time", "arguments": {}}\n```',  # not a declared tool
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}, "note": 1}\n```',  # not just a call
    '```python\nprint(1)\n```\nDone.',  # a code block
], ids=["schema", "undeclared", "extra key", "code"])
def test_other_fenced_blocks_stay_content_and_stream(hermes, text):
    with _serve(scripted_lm(hermes, text)) as base:
        choice = _whole(base)
        assert choice["message"]["content"] == text and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
        content, calls, finish = _stream(base)
        assert content == text and calls == [] and finish == "stop"


def test_a_fence_around_tool_call_markup_is_dropped_with_it(hermes):
    text = f"```xml\n<tool_call>\n{CALL}\n</tool_call>\n```"
    with _serve(scripted_lm(hermes, text)) as base:
        choice = _whole(base)
        assert choice["message"]["content"] is None and _arguments(choice["message"]["tool_calls"]) == [
            {"city": "Paris"}]
        content, calls, _ = _stream(base)
        assert content == "" and len(calls) == 1
