"""Tool calling through the model's own chat template, in the Hermes / Qwen2.5 format.

Tools are rendered by the template (`apply_chat_template(messages, tools=...)`), never by a prompt
of ours: a model calls tools well only in the format it was trained on. The one format supported is
Hermes', which Qwen2.5 (and NousResearch's Hermes models) use: the template announces the tools, and
the model answers with one or more

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template that never mentions `tools` has no tool support, and one that renders tools without
`<tool_call>` uses another format: both are refused with a ValueError naming the reason, which a
server returns as a 400.

`tool_choice`: "none" renders no tools; "auto" (the default with tools) lets the model choose;
"required" or a named function constrains the output with a grammar (grammar.py) to calls whose
`arguments` follow the function's `parameters` schema, so the model must call. OpenAI-style
messages come back in: an assistant message with `content: null` and `tool_calls` (arguments as a
JSON string) and `role: "tool"` messages are converted into what the template expects.

Parsing (`parse_tool_calls`): what is inside tool-call markup is a call or nothing, so markup
never reaches the content, even when a reply is cut inside a call; fenced ```json calls and bare
JSON calls of the declared tools are recognised too (`tool_call_spans` says why and how strictly).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aded.grammar import json_schema_lark, response_format_schema

if TYPE_CHECKING:
    from aded.grammar import Grammar

__all__ = ["TOOL_CALL_OPEN", "TOOL_CALL_CLOSE", "FENCE_OPEN", "supports_tools", "renders_tool_calls",
           "require_tool_template", "check_tools", "template_messages", "chat_prompt_ids", "output_grammar",
           "tool_call_lark", "parse_tool_calls", "tool_call_spans", "outside_spans", "fenced_calls",
           "matches_schema"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
FENCE_OPEN = "```"
_FENCE = re.compile(r"```(?:json|JSON|xml)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)  # a fenced block
_CALL_KEYS = {"name", "arguments", "parameters"}


def _template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, Mapping):  # named templates: any of them may render tools
        template = "\n".join(str(t) for t in template.values())
    return str(template)


def supports_tools(tokenizer) -> bool:
    """Does the chat template render tools at all (does it read a `tools` variable)?"""
    return re.search(r"\btools\b", _template(tokenizer)) is not None


def renders_tool_calls(tokenizer) -> bool:
    """Can the chat template show the model its earlier tool calls (does it read `tool_calls`)?"""
    return "tool_calls" in _template(tokenizer)


def require_tool_template(tokenizer, why: str) -> None:
    """ValueError unless the template renders tools, and its calls in the Hermes format aded parses
    and constrains."""
    if not supports_tools(tokenizer):
        raise ValueError(f"{why}, but this model's chat template has no tool support "
                         "(it never renders `tools`)")
    if TOOL_CALL_OPEN not in _template(tokenizer):
        raise ValueError(f"{why}, but this model's chat template renders tool calls in a format aded "
                         f"does not parse (only the Hermes/Qwen2.5 {TOOL_CALL_OPEN} JSON format)")


def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict] | None, str | dict | None]:
    """(tools, tool_choice) validated (and valid again when passed back in): tools as a list of
    OpenAI function tools or None; tool_choice "none", "auto", "required" or
    {"type": "function", "function": {"name": ...}}. ValueError names the bad field."""
    if tools is not None:
        if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
            raise ValueError(f"tools must be a list of function tools, got {tools!r}")
        tools = [_check_tool(i, tool) for i, tool in enumerate(tools)] or None
    names = [t["function"]["name"] for t in tools or ()]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: function names must be unique, got {names}")
    if tool_choice is None:
        return tools, "auto" if tools else None
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}, got ' + repr(tool_choice))
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools {names}")
        return tools, {"type": "function", "function": {"name": name}}
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f'tool_choice must be "none", "auto", "required" or a named function, '
                         f"got {tool_choice!r}")
    if tool_choice == "required" and not tools:
        raise ValueError('tool_choice "required" needs tools')
    return tools, tool_choice


def _check_tool(index: int, tool: Any) -> dict:
    where = f"tools[{index}]"
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or tool.get("type") != "function":
        raise ValueError(f'{where} must be {{"type": "function", "function": {{"name", "parameters"}}}}')
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object, got {parameters!r}")
    return {"type": "function", "function": {**function, "parameters": dict(parameters)}}


def template_messages(messages: Sequence[Mapping], tokenizer) -> list[dict]:
    """OpenAI chat messages as chat templates expect them: text content (parts joined), and tool
    calls with `arguments` as objects (templates serialise them with `tojson`); a `tool` message
    gains the called function's `name`. Tool calls and tool results need a template with tools."""
    out: list[dict] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the tool messages that answer them
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a role")
        converted = {**message, "content": _text(message.get("content"), f"messages[{i}].content")}
        calls = message.get("tool_calls")
        if calls:
            if not renders_tool_calls(tokenizer):
                raise ValueError(f"messages[{i}] holds tool calls, but this model's chat template "
                                 "cannot show earlier tool calls to the model")
            converted["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]", names)
                                       for j, call in enumerate(calls)]
        elif "tool_calls" in converted:
            del converted["tool_calls"]
        if message["role"] == "tool":  # any template that renders the role renders the result
            call_id = message.get("tool_call_id")
            if "name" not in converted and call_id in names:
                converted["name"] = names[call_id]
        out.append(converted)
    return out


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, null (an assistant that only calls tools), or text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"{where} must be a string, null or a list of text parts")


def _template_call(call: Any, where: str, names: dict[str, str]) -> dict:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f'{where} must be {{"type": "function", "function": {{"name", "arguments"}}}}')
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{where}.function.arguments must be a JSON string: {exc}") from exc
    if isinstance(call.get("id"), str):
        names[call["id"]] = function["name"]
    converted = {**call, "type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return converted


def chat_prompt_ids(tokenizer, messages: Sequence[Mapping], tools: Any = None,
                    tool_choice: Any = None) -> list[int]:
    """Token ids of chat `messages` through the model's template, with `tools` rendered unless
    `tool_choice` is "none". ValueError (a 400 for a server) for bad input or a template without
    tool support."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template")
    tools, tool_choice = check_tools(tools, tool_choice)
    if tools and tool_choice != "none":
        require_tool_template(tokenizer, "tools were given")
    else:
        tools = None
    converted = template_messages(messages, tokenizer)
    try:
        ids = tokenizer.apply_chat_template(converted, tools=tools, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    except Exception as exc:  # the template is the model's Jinja code: any error is the input's
        raise ValueError(f"the chat template rejected these messages: {exc}") from exc
    return [int(t) for t in ids]


def output_grammar(tokenizer, grammar_tokenizer: Callable[[], Any], response_format: Any = None,
                   tools: Any = None, tool_choice: Any = None) -> Grammar | None:
    """The grammar a request's output must match, or None when it is free: `response_format`'s
    JSON, tool calls (tool_choice "required" or a name), or for "auto" with a response_format
    either calls or that JSON. `grammar_tokenizer()` gives llguidance's view of `tokenizer` (called
    only when a grammar is made: it takes a second or more to build the first time)."""
    from aded.grammar import Grammar

    schema = response_format_schema(response_format)
    tools, tool_choice = check_tools(tools, tool_choice)
    if tools and tool_choice != "none" and (tool_choice != "auto" or schema is not None):
        answer = None if schema is None else json_schema_lark(schema)
        return Grammar.from_lark(tool_call_lark(tokenizer, tools, tool_choice, answer), grammar_tokenizer(),
                                 "the tool call grammar (from tools and response_format)")
    if schema is not None:
        return Grammar.from_json_schema(schema, grammar_tokenizer(), "response_format's schema")
    return None


def tool_call_lark(tokenizer, tools: list[dict], tool_choice: str | dict, answer: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for tool calls in the template's markup, each
    `{"name": <a tool>, "arguments": <its parameters>}`: one or more for "required" and "auto", one
    call of the function `tool_choice` names otherwise; "auto" also allows `answer` (a Lark
    right-hand side, e.g. a response_format's JSON) instead of calls. Arguments from `check_tools`."""
    require_tool_template(tokenizer, "tools were given")
    named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    chosen = [t["function"] for t in tools if named in (None, t["function"]["name"])]
    call_schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                                "arguments": f["parameters"]},
                              "required": ["name", "arguments"], "additionalProperties": False}
                             for f in chosen]}
    open_, close = _markup(tokenizer, TOOL_CALL_OPEN), _markup(tokenizer, TOOL_CALL_CLOSE)
    starts = {"auto": "start: calls | answer", "required": "start: calls"}
    start = "start: call" if isinstance(tool_choice, dict) else starts[tool_choice]
    rules = [start,
             'calls: call ("\\n" call)* "\\n"?',  # a last newline: the model may end after it too
             f'call: {open_} "\\n" call_body "\\n" {close}',
             f"call_body: {json_schema_lark(call_schema)}"]
    if tool_choice == "auto":
        rules.append(f"answer: {answer}")
    return "\n".join(rules)


def _markup(tokenizer, text: str) -> str:
    """`text` in Lark: its own token when the tokenizer has one (Qwen2.5's `<tool_call>` is one id,
    which llguidance would not match as text), else the literal."""
    token = tokenizer.convert_tokens_to_ids(text)
    if isinstance(token, int) and token != tokenizer.unk_token_id:
        if tokenizer.convert_ids_to_tokens(token) == text:
            return f"<[{token}]>"
    return json.dumps(text)


def parse_tool_calls(text: str, tools: Sequence[str] | Sequence[Mapping] = ()) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from generated text: each `<tool_call>{"name", "arguments"}</tool_call>`
    becomes an OpenAI tool call (`arguments` a JSON string, a fresh `call_...` id); the text around
    the calls is the content (None when only calls remain). `tools`: the declared tools (OpenAI
    function tools, or just their names).

    Tool-call markup never reaches the content: a block that is not a JSON call (cut by the token
    limit, or malformed) is dropped with its markup, as is a stray `</tool_call>`; a block cut after
    its JSON was complete still counts. Small models sometimes drop the markup: a whole answer that
    is exactly one such JSON object naming a tool is a call too, and so is a fenced ```json block
    (see `tool_call_spans`)."""
    spans = tool_call_spans(text, tools)
    if not spans:
        return text, []
    calls = [call for _, _, found in spans for call in found]
    content = outside_spans(text, spans).strip()
    return (content or None) if calls else content, calls


def tool_call_spans(text: str, tools: Sequence[str] | Sequence[Mapping] = ()) -> list[tuple[int, int, list[dict]]]:
    """(start, end, calls) of each stretch of `text` that is tool-call markup, in order; `calls` is
    empty for markup that holds no call (dropped from the content).

    Fenced JSON: Qwen2.5-Coder, asked with tools, often answers ```json\n{"name": ..., "arguments":
    ...}\n``` instead of the `<tool_call>` its template asks for. vLLM's Hermes parser
    (`hermes_tool_parser.py`) looks only for `<tool_call>` (and returns the whole text as content
    when a block does not parse); llama-server's Hermes 2 Pro parser (`common/chat.cpp`) also takes
    an optional ```json / ```xml fence before the call, and a bare `{"name": ...` object anywhere.
    aded takes the fence as llama-server does, but more strictly, because a code block is also
    what a model writes when it answers with JSON rather than calling: a fenced block is a call only
    when it is one JSON object (or a list of them) with just `name` and `arguments` (or
    `parameters`), naming a declared tool, whose arguments match that tool's `parameters` schema
    (`matches_schema`). So it needs the tools themselves, not only their names. A fence around
    `<tool_call>` blocks is dropped with them."""
    names, schemas = _declared(tools)
    stripped = text.strip()
    if stripped.startswith("{") and TOOL_CALL_OPEN not in text:
        bare = _call(stripped)
        if bare is not None and bare["function"]["name"] in names:
            return [(0, len(text), [bare])]
    spans: list[tuple[int, int, list[dict]]] = []
    for match in _CALL.finditer(text):
        call = _call(match.group(1))
        spans.append((match.start(), match.end(), [call] if call is not None else []))
    for match in re.finditer(re.escape(TOOL_CALL_CLOSE), text):
        if not any(start <= match.start() < end for start, end, _ in spans):
            spans.append((match.start(), match.end(), []))
    for fence in _FENCE.finditer(text):
        inside = [span for span in spans if fence.start() <= span[0] and span[1] <= fence.end()]
        overlapping = [span for span in spans if span[0] < fence.end() and fence.start() < span[1]]
        if inside and len(inside) == len(overlapping):
            if not outside_spans(fence.group(1), [(s - fence.start(1), e - fence.start(1), c)
                                                  for s, e, c in inside]).strip():
                spans = [span for span in spans if span not in inside]
                spans.append((fence.start(), fence.end(), [call for _, _, found in inside for call in found]))
        elif not overlapping and schemas:
            calls = fenced_calls(fence.group(1), schemas)
            if calls:
                spans.append((fence.start(), fence.end(), calls))
    return sorted(spans, key=lambda span: span[0])


def outside_spans(text: str, spans: Sequence[tuple[int, int, Any]]) -> str:
    """`text` without the stretches `spans` (sorted, not overlapping) cover."""
    kept, end = [], 0
    for start, stop, _ in spans:
        kept.append(text[end:start])
        end = stop
    kept.append(text[end:])
    return "".join(kept)


def fenced_calls(body: str, schemas: Mapping[str, Any]) -> list[dict] | None:
    """The calls a fenced block's `body` holds (see `tool_call_spans`), or None when it is not calls
    of the tools `schemas` (name -> `parameters` schema) declares."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    items = data if isinstance(data, list) and data else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in schemas or not set(item) <= _CALL_KEYS:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict) or not matches_schema(arguments, schemas[item["name"]]):
            return None
        call = _call(json.dumps({"name": item["name"], "arguments": arguments}, ensure_ascii=False))
        if call is None:
            return None
        calls.append(call)
    return calls


def matches_schema(value: Any, schema: Any) -> bool:
    """Does a JSON value match a JSON schema? The keywords tools' parameters use are checked
    (`type`, `properties`, `required`, `additionalProperties`, `items`, `enum`, `const`, `anyOf`,
    `oneOf`, `allOf`); any other keyword (`$ref`, `pattern`, bounds, ...) is not, i.e. passes."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, Mapping):
        return True
    if "const" in schema and not _same(value, schema["const"]):
        return False
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        return False
    for key, combine in (("anyOf", any), ("oneOf", any), ("allOf", all)):
        options = schema.get(key)
        if isinstance(options, list) and not combine(matches_schema(value, option) for option in options):
            return False
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is_type(value, kind) for kind in kinds):
            return False
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        if any(name not in value for name in schema.get("required") or ()):
            return False
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                if not matches_schema(item, properties[name]):
                    return False
            elif not matches_schema(item, extra):
                return False
    if isinstance(value, list) and isinstance(schema.get("items"), (Mapping, bool)):
        return all(matches_schema(item, schema["items"]) for item in value)
    return True


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    return isinstance(value, types[kind]) if kind in types else True


def _same(a: Any, b: Any) -> bool:
    """JSON equality (true is not 1)."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _declared(tools: Sequence[str] | Sequence[Mapping]) -> tuple[set[str], dict[str, Any]]:
    """(names, name -> parameters schema) of the declared tools (no schemas when given only names)."""
    names: set[str] = set()
    schemas: dict[str, Any] = {}
    for tool in tools or ():
        if isinstance(tool, str):
            names.add(tool)
        elif isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            name = tool["function"].get("name")
            if isinstance(name, str):
                names.add(name)
                schemas[name] = tool["function"].get("parameters", {"type": "object"})
    return names, schemas


def _call(body: str) -> dict | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already serialised
        text = arguments
    else:
        text = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": data["name"], "arguments": text}}
