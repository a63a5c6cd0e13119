"""The text API: prompts, chat templates, streaming text and stop strings."""

import pytest
from conftest import hf_greedy, tiny_tokenizer
from offline_tokenizers import CountingTokenizer, ids_of, offline_tokenizer
from scripted import ScriptDrafter, ScriptedRunner


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


def scripted_lm(tokenizer, script: list[int], depth: int):
    """An `Aded` whose output is `script`, committed `depth` + 1 tokens a step (prompt: [1])."""
    from aded.api import Aded

    return Aded(ScriptedRunner(script, len(tokenizer)), tokenizer, ScriptDrafter(script, 1, depth),
                budget="off")


def test_a_stop_string_before_an_eos_in_the_same_step_cuts_the_text_there():
    tokenizer = tiny_tokenizer()
    script = ids_of(tokenizer, "ok STOP then") + [tokenizer.eos_token_id] + ids_of(tokenizer, "more")
    stream = scripted_lm(tokenizer, script, depth=64).stream([1], stop=["STOP"], max_new_tokens=40)
    assert "".join(stream) == stream.completion.text == "ok "
    assert stream.completion.token_ids == ids_of(tokenizer, "ok STOP")
    assert stream.completion.finish_reason == "stop" and stream.completion.stats.steps == 1


def test_an_eos_before_a_stop_string_in_the_same_step_ends_the_text_there():
    tokenizer = tiny_tokenizer()
    script = ids_of(tokenizer, "ok") + [tokenizer.eos_token_id] + ids_of(tokenizer, "STOP more")
    stream = scripted_lm(tokenizer, script, depth=64).stream([1], stop=["STOP"], max_new_tokens=40)
    assert "".join(stream) == stream.completion.text == "ok"
    assert stream.completion.token_ids == ids_of(tokenizer, "ok") + [tokenizer.eos_token_id]
    assert stream.completion.finish_reason == "stop"


@pytest.mark.parametrize("depth", [0, 64])
def test_a_stop_string_in_text_still_held_back_ends_the_text(depth):
    """Byte tokens release text only when their run ends; an EOS may come first."""
    tokenizer = offline_tokenizer("sentencepiece")
    script = ids_of(tokenizer, "hi 😀") + [tokenizer.eos_token_id] + ids_of(tokenizer, "more")
    stream = scripted_lm(tokenizer, script, depth).stream([1], stop=["😀"], max_new_tokens=40)
    assert "".join(stream) == stream.completion.text == "hi "
    assert stream.completion.token_ids == ids_of(tokenizer, "hi 😀")
    assert stream.completion.finish_reason == "stop"


@pytest.mark.parametrize("depth", [0, 1, 4, 64])
def test_stop_strings_end_the_text_as_plain_decoding_would_whatever_the_steps(depth):
    """"bc" is complete one token before "abcd" is: the text ends there, however many tokens the
    step that brought them committed."""
    tokenizer = tiny_tokenizer()
    script = ids_of(tokenizer, "xabcdy and more")
    stream = scripted_lm(tokenizer, script, depth).stream([1], stop=["abcd", "bc"], max_new_tokens=40)
    assert "".join(stream) == stream.completion.text == "xa"
    assert stream.completion.token_ids == ids_of(tokenizer, "xabc")


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("depth", [0, 3])
def test_streamed_text_is_the_full_decode_cut_at_the_stop_string(name, depth):
    tokenizer = offline_tokenizer(name)
    full = "naïve café, 世界 😀 ok. " * 4 + "END here"
    script = ids_of(tokenizer, full)
    lm = scripted_lm(tokenizer, script, depth)
    stream = lm.stream([1], max_new_tokens=len(script))
    assert "".join(stream) == stream.completion.text == tokenizer.decode(script) == full
    stream = lm.stream([1], stop=["END", "😀 ok. " * 5], max_new_tokens=len(script))
    assert "".join(stream) == stream.completion.text == full[: full.index("END")]
    ids = stream.completion.token_ids
    assert ids == script[: len(ids)] and "END" in tokenizer.decode(ids) and "END" not in tokenizer.decode(ids[:-1])


def test_streaming_decodes_each_token_a_bounded_number_of_times():
    """Work, not time: a 2,000-token stream with a stop string to watch for decodes O(n) ids in all
    (re-decoding the whole output every step would decode O(n^2))."""
    tokenizer = offline_tokenizer("byte-level")
    counting = CountingTokenizer(tokenizer)
    text = "".join(f"Line {i}: naïve café, 世界 😀 and some plain words.\n" for i in range(400))
    script = ids_of(tokenizer, text)[:2000]
    assert len(script) == 2000
    stream = scripted_lm(counting, script, depth=3).stream([1], stop=["never said"], max_new_tokens=2000)
    streamed = "".join(stream)
    assert stream.completion.stats.generated_tokens == 2000
    assert counting.decoded_ids <= 8 * len(script)  # the completion's one full decode included
    assert streamed == stream.completion.text == tokenizer.decode(script, skip_special_tokens=True)


def test_temperature_zero_means_greedy(tiny_lm):
    a = tiny_lm.generate("q", chat=False, max_new_tokens=10, temperature=0)
    b = tiny_lm.generate("q", chat=False, max_new_tokens=10)
    assert a.token_ids == b.token_ids


def test_json_shape(tiny_lm):
    data = tiny_lm.generate("q", chat=False, max_new_tokens=5).as_dict()
    assert set(data) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "stats"}
    assert set(data["stats"]) == {"steps", "generated_tokens", "mean_accepted_tokens", "prefill_s",
                                  "cached_prompt_tokens", "decode_s", "draft_s", "verify_s", "decode_tokens_per_s"}
    assert data["stats"]["cached_prompt_tokens"] == 0  # transformers runs every prompt whole


def test_unknown_drafter_is_a_clear_error():
    from aded.drafters import make_drafter

    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        make_drafter("nope")
    with pytest.raises(ValueError, match="backend's default drafter"):
        make_drafter("auto")  # only a runner knows its backend


def test_the_default_drafter_is_the_backends(tiny_lm):
    from aded.api import Aded
    from aded.drafters import DEFAULT_DRAFTERS, default_drafter

    lm = Aded(tiny_lm.model, tiny_lm.tokenizer, budget="off")  # drafter="auto"
    assert lm.backend == "hf" and lm.drafter.name == DEFAULT_DRAFTERS["hf"]
    ids = lm.prompt_ids("abcabcabc abcabc", chat=False)
    assert lm.generate(ids, max_new_tokens=20).token_ids == hf_greedy(lm.model, ids, 20)
    assert default_drafter("vllm") == DEFAULT_DRAFTERS["llama.cpp"]  # one path a step, as llama.cpp


def test_learned_state_saved_by_one_aded_starts_the_next(tiny_lm, tmp_path):
    import numpy as np

    from aded.api import Aded

    learner = Aded(tiny_lm.model, tiny_lm.tokenizer, drafter="suffix", budget="off")
    learner.generate("abcabcabc abcabc", chat=False, max_new_tokens=20)
    learner.save_learned(tmp_path / "s.npz")
    later = Aded(tiny_lm.model, tiny_lm.tokenizer, drafter="suffix", budget="off")
    assert "loaded learned state" in later.load_learned(tmp_path / "s.npz")
    saved, loaded = learner.drafter.state_dict(), later.drafter.state_dict()
    assert saved.keys() == loaded.keys() and saved
    assert all(np.array_equal(saved[k], loaded[k]) for k in saved)
    ids = later.prompt_ids("abcabcabc abcabc", chat=False)
    assert later.generate(ids, max_new_tokens=20).token_ids == hf_greedy(later.model, ids, 20)
