"""Request bodies -> validated request models; every way a body can be wrong is a `RequestError`.

JSON is parsed by the standard library (a body nested deeper than its parser allows raises
RecursionError, caught here), then walked once, without recursion, to refuse nesting deeper than
`MAX_DEPTH` and strings holding lone surrogates (no tokenizer or JSON encoder accepts them, so they
would fail later as a 500). Pydantic then sees only plain, shallow data; an unknown field is
refused by name, and a field in `NOT_SUPPORTED_YET` at a value other than its neutral one too.

Pydantic validates without letting other threads run, so a long list (30,000 messages) is
validated `CHUNK` items at a time: the engine and the event loop get the interpreter in between.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from aded.server.errors import RequestError
from aded.server.schemas import NOT_SUPPORTED_YET, FieldError

__all__ = ["MAX_DEPTH", "parse_body", "parse_json_object", "decode_body"]

MAX_DEPTH = 64  # JSON schemas of tools and response formats nest, but not this deep
CHUNK = 256  # list items validated at a time
_SURROGATE = re.compile("[\ud800-\udfff]")

Request = TypeVar("Request", bound=BaseModel)


def parse_body(raw: bytes | str | dict[str, Any], model: type[Request]) -> Request:
    """The request in `raw` (a JSON object, or one parsed by `parse_json_object`) validated as `model`."""
    request = _validated(model, raw if isinstance(raw, dict) else parse_json_object(raw, ""))
    _refuse_unsupported(request)
    return request


def decode_body(raw: bytes, charset: str | None) -> bytes | str:
    """The body as the `charset` of its Content-Type gives it: UTF-8 (or none given) is left to
    the JSON parser, which reads UTF-8, -16 and -32; any other text encoding Python knows (such as
    latin-1) is decoded, so its characters arrive as sent; an unknown charset is a 415 naming it."""
    if charset is None or charset.strip().lower().replace("_", "-") in ("utf-8", "utf8"):
        return raw
    try:
        return raw.decode(codecs.lookup(charset).name)
    except LookupError:  # unknown, or not a text encoding (base64, ...)
        raise RequestError(f"the body's charset {charset!r} is not a text encoding this server knows; send "
                           "UTF-8", 415, param="charset", code="unsupported_charset") from None
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not valid {charset}: {exc.reason} at byte {exc.start}",
                           param="charset") from None


def parse_json_object(text: bytes | str, where: str) -> dict[str, Any]:
    """A JSON object from `text` (the body, or a JSON string inside it at `where`), checked."""
    what = where or "the request body"
    try:
        value = json.loads(text)
    except RecursionError:
        raise RequestError(f"{what} nests too deeply to parse", param=where or None) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"{what} is not valid JSON: {exc}", param=where or None) from exc
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__}", param=where or None)
    _check_tree(value, where)
    return value


def _check_tree(body: dict[str, Any], root: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and lone surrogates, naming where they are."""
    stack: list[tuple[Any, int, str]] = [(body, 0, root)]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise RequestError(f"{where or 'the body'} holds a lone UTF-16 surrogate, which is not "
                                   "text; send valid Unicode", param=where or None)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise RequestError(f"{where} nests deeper than {MAX_DEPTH} levels", param=where or None)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                raise RequestError("a field name holds a lone UTF-16 surrogate; send valid Unicode",
                                   param=where or None)
            stack.append((item, depth + 1, path))


def _validated(model: type[Request], body: dict[str, Any]) -> Request:
    try:
        return model.model_validate({**body, **_long_lists(model, body)})
    except ValidationError as exc:
        raise _refusal(exc.errors(include_url=False, include_input=False)) from exc


def _refusal(errors: Sequence[Any]) -> RequestError:
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    blamed = first.get("ctx", {}).get("error")
    if isinstance(blamed, FieldError):
        where = ".".join(filter(None, (where, blamed.param)))
    problems = "; ".join(_problem(e) for e in errors[:5])
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(first["type"], "invalid_value")
    return RequestError(f"invalid request: {problems}", param=where, code=code)


def _long_lists(model: type[BaseModel], body: dict[str, Any]) -> dict[str, list]:
    """Long lists of the body validated `CHUNK` items at a time (the model then takes the items
    as they are); an error names the item by its index in the whole list."""
    out = {}
    for name, value in body.items():
        if name not in model.model_fields or not isinstance(value, list) or len(value) <= CHUNK:
            continue
        adapter = _adapter(model, name)
        items: list = []
        for start in range(0, len(value), CHUNK):
            try:
                items += adapter.validate_python(value[start:start + CHUNK])
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False)
                for error in errors:  # the first index is the item's in the chunk: make it the list's
                    loc = list(error["loc"])
                    at = next((i for i, part in enumerate(loc) if isinstance(part, int)), None)
                    if at is not None:
                        loc[at] = int(loc[at]) + start
                    error["loc"] = (name, *loc)
                raise _refusal(errors) from exc
        out[name] = items
    return out


@functools.cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(model.model_fields[name].annotation or Any, config=model.model_config)


def _problem(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "body"
    blamed = error.get("ctx", {}).get("error")
    if isinstance(blamed, FieldError):
        return f"{blamed.param}: {blamed}"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field (refused rather than ignored)"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def _refuse_unsupported(request: BaseModel) -> None:
    for name, neutral in NOT_SUPPORTED_YET.items():
        if name in type(request).model_fields and not neutral(getattr(request, name)):
            raise RequestError(f"{name} is not supported yet by this server; leave it out or at its default",
                               param=name, code="unsupported_parameter")
