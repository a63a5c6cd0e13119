"""Incremental detokenization: the pieces concatenate to the full decode, on every kind of tokenizer
(byte-level BPE, SentencePiece with byte fallback, characters), and stop strings are found across
pieces."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from offline_tokenizers import TOKENIZERS, CountingTokenizer, ids_of, offline_tokenizer, sentencepiece_tokenizer

from aded.detokenize import IncrementalDetokenizer, StopFinder


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request):
    return offline_tokenizer(request.param)


def pieces(tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(token_id) for token_id in ids]


def assert_streams_the_full_decode(tokenizer, ids: list[int]) -> None:
    """Every piece extends the text for good (it is a prefix of the final decode), and a plain ASCII
    token at the end releases whatever was held back."""
    ids = ids + ids_of(tokenizer, "a")[-1:]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    text = ""
    for piece in pieces(tokenizer, ids):
        text += piece
        assert full.startswith(text)
    assert text == full


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_random_ids_stream_to_the_full_decode(tokenizer, data):
    """Any ids at all: specials, partial UTF-8 bytes, byte-fallback tokens, in any order."""
    low_ids = st.integers(0, min(len(tokenizer), 300) - 1)  # specials and byte tokens live here
    any_ids = st.integers(0, len(tokenizer) - 1)
    ids = data.draw(st.lists(st.one_of(low_ids, any_ids), max_size=40))
    assert_streams_the_full_decode(tokenizer, ids)


@SETTINGS
@given(texts=st.lists(st.text(max_size=12), max_size=6), specials=st.lists(st.integers(0, 2), max_size=6))
def test_text_with_multibyte_characters_streams_to_the_full_decode(tokenizer, texts, specials):
    """Real encodings of any Unicode text (accents, CJK, emoji: several tokens per character),
    with special tokens between them."""
    ids = []
    for i, text in enumerate(texts):
        ids += ids_of(tokenizer, text) + specials[i: i + 1]
    assert_streams_the_full_decode(tokenizer, ids)


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
def test_a_character_is_held_back_until_its_last_byte_arrives(name):
    tokenizer = offline_tokenizer(name)
    ids = ids_of(tokenizer, "ok 😀!")
    out = pieces(tokenizer, ids)
    assert "".join(out) == "ok 😀!"
    assert any("😀" in piece for piece in out) and not any("\ufffd" in piece for piece in out)
    assert "" in out[len(ids_of(tokenizer, "ok")):]  # the emoji's first tokens return nothing


def test_held_text_is_the_text_as_it_decodes_now():
    tokenizer = sentencepiece_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    held = []
    for token_id in ids_of(tokenizer, "ok 😀"):
        piece = detokenizer.push(token_id)
        held.append(detokenizer.held_text)
    assert piece == "" and held[-3:] == ["\ufffd\ufffd", "\ufffd\ufffd\ufffd", "😀"]


def test_sentencepiece_spaces_follow_the_token_before():
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["▁hello", "▁world", "▁the"])
    assert tokenizer.decode(ids[1:2]) == "world"  # alone, the leading space is stripped
    assert pieces(tokenizer, ids) == ["hello", " world", " the"]


def test_a_byte_fallback_run_is_text_only_as_a_whole():
    """One invalid byte turns the whole run of byte tokens into U+FFFD, so nothing of a run is
    released before it ends."""
    tokenizer = sentencepiece_tokenizer()
    run = tokenizer.convert_tokens_to_ids(["<0xE4>", "<0xB8>", "<0x96>"])  # "世"
    x, bad = tokenizer.convert_tokens_to_ids(["x", "<0xFF>"])
    assert pieces(tokenizer, run + [x]) == ["", "", "", "世x"]
    assert pieces(tokenizer, run + [bad, x]) == ["", "", "", "", "\ufffd" * 4 + "x"]
    assert tokenizer.decode(run + [bad, x]) == "\ufffd" * 4 + "x"


def test_each_id_is_decoded_a_bounded_number_of_times(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = ids_of(tokenizer, "The quick brown fox, naïve café 世界 😀 jumps. " * 40)
    assert "".join(pieces(counting, ids)) == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded_ids <= 8 * len(ids)


# ---------------------------------------------------------------------------- stop strings
def test_stop_finder_sees_a_stop_string_across_pieces():
    finder = StopFinder(["STOP", "##"])
    assert finder.holdback == 3
    assert [finder.find(p) for p in ["ab", "cST", "O"]] == [None, None, None]
    assert finder.find("Pxyz") == 3  # counted from the first character fed


def test_stop_finder_searches_held_text_without_keeping_it():
    finder = StopFinder(["STOP"])
    assert finder.find("ab", held="ST") is None
    assert finder.find("", held="STOP") == 2
    assert finder.find("cd", held="OP") is None  # "ST" was never fed


def test_stop_finder_takes_the_earliest_start_then_the_shortest():
    assert StopFinder(["bcd", "abcd", "cd"]).find("xabcdy") == 1
    assert StopFinder(["abc", "ab"]).find("abc") == 0
    finder = StopFinder(["ab", "abc"])
    assert finder.find("zab") == 1


def test_empty_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopFinder(["ok", ""])
    with pytest.raises(ValueError, match="non-empty"):
        StopFinder([])
