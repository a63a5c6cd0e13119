"""The text API: prompts, chat templates, streaming text and stop strings."""

import pytest

from conftest import hf_greedy


def test_generate_equals_greedy_and_stream_concatenates_to_the_text(tiny_lm):
    ids = tiny_lm.prompt_ids("abcabcabc abcabc", chat=False)
    reference = hf_greedy(tiny_lm.model, ids, 30)
    completion = tiny_lm.generate("abcabcabc abcabc", chat=False, max_new_tokens=30)
    assert completion.token_ids == reference
    assert completion.prompt_token_ids == ids
    stream = tiny_lm.stream("abcabcabc abcabc", chat=False, max_new_tokens=30)
    assert "".join(stream) == stream.completion.text == tiny_lm.tokenizer.decode(reference, skip_special_tokens=True)


def test_chat_template_is_applied_by_default(tiny_lm):
    ids = tiny_lm.prompt_ids("hi")
    assert tiny_lm.tokenizer.decode(ids).startswith("<s>user: hi\n<s>assistant: ")
    assert tiny_lm.prompt_ids([{"role": "user", "content": "hi"}]) == ids


def test_stop_string_cuts_text_and_tokens(tiny_lm):
    full = tiny_lm.generate("xyz", chat=False, max_new_tokens=40)
    text = full.text
    stop = text[10:13]
    cut = text.find(stop)
    stream = tiny_lm.stream("xyz", chat=False, max_new_tokens=40, stop=[stop])
    streamed = "".join(stream)
    completion = stream.completion
    assert streamed == completion.text == text[:cut]
    assert completion.finish_reason == "stop"
    assert completion.token_ids == full.token_ids[: len(completion.token_ids)]
    assert stop in tiny_lm.tokenizer.decode(completion.token_ids)


def test_temperature_zero_means_greedy(tiny_lm):
    a = tiny_lm.generate("q", chat=False, max_new_tokens=10, temperature=0)
    b = tiny_lm.generate("q", chat=False, max_new_tokens=10)
    assert a.token_ids == b.token_ids


def test_json_shape(tiny_lm):
    data = tiny_lm.generate("q", chat=False, max_new_tokens=5).as_dict()
    assert set(data) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "stats"}
    assert set(data["stats"]) == {"steps", "generated_tokens", "mean_accepted_tokens", "prefill_s",
                                  "decode_s", "draft_s", "verify_s", "decode_tokens_per_s"}


def test_unknown_drafter_is_a_clear_error():
    from aded.drafters import make_drafter

    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        make_drafter("nope")
