"""The generation fields the library honours are honoured by the server too, with the library's
answers (issue 14, defect 1): `logit_bias`, the penalties, `min_p`, `stop_token_ids`, `ignore_eos`,
`min_tokens`, and logprobs in OpenAI's chat and completions shapes, streamed or not.

The model is served in this process with the prompt-lookup drafter (no learned state), so a served
request and the same request to `Aded.generate` verify the same draft trees: equal answers, equal
logprobs."""

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
PROMPT = "def f(x):"
EOS = 1  # the tiny model's
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def lm(tiny_dir):
    import aded

    return aded.load(str(tiny_dir), drafter="pld", budget="off")


@pytest.fixture(scope="module")
def url(lm):
    from aded.server.app import ServerConfig, create_app

    with serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, default_max_tokens=MAX_TOKENS))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _body(path: str, **fields) -> dict:
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}
    return {"model": MODEL, **prompt, "temperature": 0, "max_tokens": MAX_TOKENS, **fields}


def _served(url: str, path: str, **fields) -> dict:
    response = post(url, path, _body(path, **fields))
    assert response.status_code == 200, response.text
    return response.json()


def _text(reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _direct(lm, path: str, **generation):
    """The same request to the library."""
    generation = {"max_new_tokens": MAX_TOKENS, "temperature": 0, **generation}
    if path == CHAT:
        return lm.generate(MESSAGES, **generation)
    return lm.generate(PROMPT, chat=False, **generation)


ENDPOINTS = pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])


# ---------------------------------------------------------------------------- fields that change the output
@ENDPOINTS
def test_logit_bias_against_the_first_token_changes_the_answer_as_in_the_library(url, lm, path):
    plain = _direct(lm, path)
    assert _text(_served(url, path)) == plain.text
    first = plain.token_ids[0]
    biased = _served(url, path, logit_bias={str(first): -100})
    direct = _direct(lm, path, logit_bias={first: -100})
    assert _text(biased) == direct.text != plain.text
    assert direct.token_ids[0] != first


@ENDPOINTS
def test_stop_token_ids_end_the_answer_without_the_token_text_as_vllm(url, lm, path):
    """The library keeps the stop id's text; vLLM drops it unless include_stop_str_in_output (issue
    30, finding 8): the server answers as vLLM, streamed or not."""
    plain = _direct(lm, path)
    stop = plain.token_ids[2]
    served = _served(url, path, stop_token_ids=[stop])
    direct = _direct(lm, path, stop_token_ids=[stop])
    assert len(direct.token_ids) < len(plain.token_ids) and direct.token_ids[-1] == stop
    assert _text(served) == direct.text[:-len(_token(lm, stop))]
    assert served["choices"][0]["finish_reason"] == direct.finish_reason == "stop"
    assert served["usage"]["completion_tokens"] == len(direct.token_ids)
    kept = _served(url, path, stop_token_ids=[stop], include_stop_str_in_output=True)
    assert _text(kept) == direct.text
    assert _streamed_text(url, path, stop_token_ids=[stop]) == _text(served)
    assert _streamed_text(url, path, stop_token_ids=[stop], include_stop_str_in_output=True) == direct.text


def _streamed_text(url: str, path: str, **fields) -> str:
    with httpx.stream("POST", url + path, json={**_body(path, **fields), "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    return "".join(c["delta"].get("content") or "" if "delta" in c else c["text"] for c in choices)


PENALTIES = [{"repetition_penalty": 1.8}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
             {"presence_penalty": -2.0, "min_p": 0.2}]


@ENDPOINTS
@pytest.mark.parametrize("fields", PENALTIES, ids=lambda f: ",".join(f))
def test_penalties_and_min_p_give_the_library_answer(url, lm, path, fields):
    served = _served(url, path, **fields)
    direct = _direct(lm, path, **fields)
    assert _text(served) == direct.text
    assert served["usage"]["completion_tokens"] == len(direct.token_ids)


def test_a_strong_repetition_penalty_changes_the_answer(url, lm):
    plain = _direct(lm, COMPLETIONS)
    penalised = _direct(lm, COMPLETIONS, repetition_penalty=1.8)
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    assert _text(_served(url, COMPLETIONS, repetition_penalty=1.8)) == penalised.text != plain.text


@ENDPOINTS
def test_min_tokens_and_ignore_eos_hold_back_a_forced_eos(url, lm, path):
    force_eos = {"logit_bias": {str(EOS): 100}}
    ended = _served(url, path, **force_eos)
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["finish_reason"] == "stop"

    held = _served(url, path, **force_eos, min_tokens=5)
    direct = _direct(lm, path, logit_bias={EOS: 100}, min_tokens=5)
    assert held["usage"]["completion_tokens"] == len(direct.token_ids) == 6  # five others, then EOS
    assert _text(held) == direct.text and held["choices"][0]["finish_reason"] == "stop"

    ignored = _served(url, path, **force_eos, ignore_eos=True)
    direct = _direct(lm, path, logit_bias={EOS: 100}, ignore_eos=True)
    assert direct.token_ids == [EOS] * MAX_TOKENS
    assert ignored["usage"]["completion_tokens"] == MAX_TOKENS and ignored["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------- logprobs
def _token(lm, token_id: int) -> str:
    return lm.tokenizer.decode([token_id], skip_special_tokens=False)


@pytest.mark.parametrize("top", [0, 3, 20])
def test_chat_logprobs_are_the_library_ones_and_the_openai_client_parses_them(client, lm, top):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                           logprobs=True, top_logprobs=top)
    direct = _direct(lm, CHAT, logprobs=True, top_logprobs=top)
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == direct.text
    assert len(content) == len(direct.logprobs) == len(direct.token_ids)
    for served, expected in zip(content, direct.logprobs):
        assert served.token == _token(lm, expected.token_id)
        assert served.bytes == list(served.token.encode("utf-8"))
        assert served.logprob == pytest.approx(expected.logprob, abs=1e-6)
        assert len(served.top_logprobs) == top
        for alternative, (token_id, logprob) in zip(served.top_logprobs, expected.top):
            assert alternative.token == _token(lm, token_id)
            assert alternative.logprob == pytest.approx(logprob, abs=1e-6)


@pytest.mark.parametrize("top", [0, 2, 5])
def test_completions_logprobs_are_the_library_ones(client, lm, top):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS,
                                      logprobs=top)
    direct = _direct(lm, COMPLETIONS, logprobs=True, top_logprobs=top)
    logprobs = reply.choices[0].logprobs
    assert reply.choices[0].text == direct.text
    assert logprobs.tokens == [_token(lm, e.token_id) for e in direct.logprobs]
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in direct.logprobs], abs=1e-6)
    # with logprobs 0 each item holds the sampled token's own entry, as OpenAI answers (issue 30, finding 5)
    assert logprobs.top_logprobs == [pytest.approx({_token(lm, i): lp for i, lp in e.top} if top else
                                                   {_token(lm, e.token_id): e.logprob}, abs=1e-6)
                                     for e in direct.logprobs]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_no_logprobs_unless_asked(url):
    """`logprobs: null`, as OpenAI writes it."""
    assert _served(url, CHAT)["choices"][0]["logprobs"] is None
    assert _served(url, COMPLETIONS)["choices"][0]["logprobs"] is None
    assert _served(url, CHAT, logprobs=False)["choices"][0]["logprobs"] is None


def _events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_chat_logprobs_are_those_of_the_whole_answer(client, url):
    whole = _served(url, CHAT, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stream=True,
                                                 max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=2))
    streamed = [entry.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content]
    assert len(streamed) == len(whole) == MAX_TOKENS
    for got, expected in zip(streamed, whole):
        assert got["token"] == expected["token"] and got["logprob"] == pytest.approx(expected["logprob"], abs=1e-6)
        assert [t["token"] for t in got["top_logprobs"]] == [t["token"] for t in expected["top_logprobs"]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(entry["token"] for entry in whole)  # char-level tokens: text is the tokens


def test_streamed_completions_logprobs_come_with_their_text(url):
    body = _body(COMPLETIONS, logprobs=1, stream=True)
    whole = _served(url, COMPLETIONS, logprobs=1)["choices"][0]["logprobs"]
    events = _events(url, body)
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0].get("logprobs")]
    assert len(parts) >= 2  # more than one chunk carries logprobs
    assert [t for p in parts for t in p["tokens"]] == whole["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == whole["text_offset"]
    assert [lp for p in parts for lp in p["token_logprobs"]] == pytest.approx(whole["token_logprobs"], abs=1e-6)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == "".join(whole["tokens"])


# ---------------------------------------------------------------------------- bad values
BAD = [
    ("logit_bias key not a number", CHAT, {"logit_bias": {"red": 1}}, "logit_bias"),
    ("logit_bias key negative", COMPLETIONS, {"logit_bias": {"-3": 1}}, "logit_bias"),
    ("logit_bias key of 5000 digits", CHAT, {"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ("logit_bias above 100", CHAT, {"logit_bias": {"5": 100.5}}, "logit_bias"),
    ("logit_bias not a number", COMPLETIONS, {"logit_bias": {"5": "high"}}, "logit_bias.5"),
    ("logit_bias outside the vocabulary", CHAT, {"logit_bias": {"99": -100}}, "logit_bias"),
    ("stop_token_ids outside the vocabulary", COMPLETIONS, {"stop_token_ids": [3, 1000]}, "stop_token_ids"),
    ("stop_token_ids negative", CHAT, {"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ("stop_token_ids not integers", CHAT, {"stop_token_ids": [2.5]}, "stop_token_ids.0"),
    ("presence_penalty above 2", CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency_penalty below -2", COMPLETIONS, {"frequency_penalty": -3}, "frequency_penalty"),
    ("repetition_penalty zero", CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    ("min_p above 1", COMPLETIONS, {"min_p": 1.5}, "min_p"),
    ("min_tokens above max_tokens", CHAT, {"min_tokens": MAX_TOKENS + 1}, "min_tokens"),
    ("min_tokens negative", COMPLETIONS, {"min_tokens": -1}, "min_tokens"),
    ("ignore_eos a string", CHAT, {"ignore_eos": "yes"}, "ignore_eos"),
    ("chat logprobs a number", CHAT, {"logprobs": 2}, "logprobs"),
    ("top_logprobs above 20", CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {"top_logprobs": 2}, "top_logprobs"),
    ("completions logprobs above 5", COMPLETIONS, {"logprobs": 6}, "logprobs"),
    ("completions logprobs true", COMPLETIONS, {"logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize("label,path,fields,param", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_refused_naming_the_field(url, label, path, fields, param):
    response = post(url, path, _body(path, **fields))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert param.split(".")[0] in error["message"]


def test_infinite_repetition_penalty_is_refused(url):
    raw = json.dumps(_body(CHAT)).encode()[:-1] + b', "repetition_penalty": Infinity}'
    response = post(url, CHAT, raw)
    assert response.status_code == 400 and response.json()["error"]["param"] == "repetition_penalty"
