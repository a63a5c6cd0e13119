"""Datastore: counting, pruning, back-off tables, the file format and its failure modes, corpora."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aded.store.build import BuildParams, NgramCounter, build_datastore, top_k_prune
from aded.store.corpus import corpus_files, documents_of, iter_documents
from aded.store.datastore import Datastore, DatastoreError, TokenizerIdentity, tokenizer_identity

V = 12


class WordTokenizer:
    """A whitespace tokenizer over a fixed vocabulary: enough for building datastores in tests."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(words)}
        self.name_or_path = "words"

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.get(w, 0) for w in text.split()]


def brute_counts(docs):
    tri, bi = Counter(), Counter()
    for doc in docs:
        for a, b, c in zip(doc, doc[1:], doc[2:]):
            tri[(a, b, c)] += 1
            bi[(b, c)] += 1
    return tri, bi


def table(store: Datastore, kind: str) -> dict:
    """{context: {next: count}} read back through the public lookups."""
    out = {}
    for a in range(V):
        for b in range(V):
            ids, counts, total = store.trigram(a, b) if kind == "tri" else store.bigram(b)
            if len(ids):
                out[(a, b) if kind == "tri" else b] = (dict(zip(ids.tolist(), counts.tolist())), total)
        if kind == "bi":
            break
    return out


docs_strategy = st.lists(st.lists(st.integers(0, V - 1), min_size=0, max_size=30), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, k=st.integers(1, 4), spill=st.booleans())
def test_counts_match_brute_force_and_keep_top_k(docs, k, spill):
    params = BuildParams(top_k=k, bigram_top_k=k, chunk_tokens=7 if spill else 1 << 20, max_pairs=6 if spill else 1 << 24, num_buckets=3)
    counter = NgramCounter(V, params)
    for doc in docs:
        counter.add(doc)
    store = Datastore(counter.finish(), TokenizerIdentity("t", V, "h"))
    tri, bi = brute_counts(docs)
    for kind, brute in (("tri", tri), ("bi", bi)):
        expected: dict = {}
        for key, n in brute.items():
            expected.setdefault(key[:2] if kind == "tri" else key[0], {})[key[-1]] = n
        got = table(store, kind)
        assert set(got) == set(expected)
        for context, followers in expected.items():
            kept, total = got[context]
            assert total == sum(followers.values())  # totals are before pruning
            best = sorted(followers.items(), key=lambda item: (-item[1], item[0]))[:k]
            assert kept == dict(best)


def test_top_k_prune_orders_by_count_then_id():
    groups = np.array([5, 5, 5, 2, 2])
    items = np.array([1, 2, 3, 9, 8])
    counts = np.array([1, 4, 4, 2, 7])
    keys, offsets, totals, kept, kept_counts = top_k_prune(groups, items, counts, 2)
    assert keys.tolist() == [2, 5] and offsets.tolist() == [0, 2, 4] and totals.tolist() == [9, 9]
    assert kept.tolist() == [8, 9, 2, 3] and kept_counts.tolist() == [7, 2, 4, 4]


def test_min_count_drops_rare_contexts():
    counter = NgramCounter(V, BuildParams(min_count=2))
    counter.add([1, 2, 3, 1, 2, 4, 5, 6, 7])
    store = Datastore(counter.finish(), TokenizerIdentity("t", V, "h"))
    assert store.trigram(1, 2)[2] == 2.0 and store.trigram(5, 6)[2] == 0.0
    assert store.bigram(6)[2] == 1.0  # back-off tables keep everything


def small_store(tmp_path: Path) -> tuple[Path, Datastore]:
    counter = NgramCounter(V)
    counter.add([1, 2, 3, 1, 2, 3, 1, 2, 4])
    store = Datastore(counter.finish(), TokenizerIdentity("t", V, "abc"), {"top_k": 12}, {"tokens": 9})
    path = tmp_path / "s.aded"
    store.save(path)
    return path, store


def test_round_trip(tmp_path):
    path, store = small_store(tmp_path)
    loaded = Datastore.load(path, expect=TokenizerIdentity("other name", V, "abc"))
    for name, array in store.arrays.items():
        assert np.array_equal(loaded.arrays[name], array) and loaded.arrays[name].dtype == array.dtype
    assert loaded.params == {"top_k": 12} and loaded.stats == {"tokens": 9}
    ids, counts, total = loaded.trigram(1, 2)
    assert ids.tolist() == [3, 4] and counts.tolist() == [2.0, 1.0] and total == 3.0
    assert loaded.trigram(9, 9)[0].size == 0 and loaded.bigram(V + 5)[0].size == 0
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary behind


def test_tokenizer_mismatch_is_refused(tmp_path):
    path, _ = small_store(tmp_path)
    with pytest.raises(DatastoreError, match="built for tokenizer"):
        Datastore.load(path, expect=TokenizerIdentity("t", V, "xyz"))


def test_version_mismatch_is_refused(tmp_path):
    path, _ = small_store(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match="format version 99"):
        Datastore.load(path)


def test_truncated_file_is_refused(tmp_path):
    path, _ = small_store(tmp_path)
    data = path.read_bytes()
    for size in (len(data) - 1, 100, 20):
        path.write_bytes(data[:size])
        with pytest.raises(DatastoreError, match="truncated"):
            Datastore.load(path)


def test_flipped_bytes_are_detected(tmp_path):
    path, _ = small_store(tmp_path)
    data = path.read_bytes()
    header_end = 56 + struct.unpack("<Q", data[16:24])[0]
    for position in (60, header_end + 70, len(data) - 3):  # header, first array, last array
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(DatastoreError, match="checksum|corrupt|not JSON"):
            Datastore.load(path)


def test_not_a_datastore(tmp_path):
    path = tmp_path / "x.aded"
    path.write_bytes(b"hello world, this is not a datastore at all, not even close......")
    with pytest.raises(DatastoreError, match="magic"):
        Datastore.load(path)


def test_tokenizer_identity_depends_on_vocabulary():
    first = tokenizer_identity(WordTokenizer(["a", "b", "c"]))
    assert first == tokenizer_identity(WordTokenizer(["a", "b", "c"]))
    assert first.vocab_hash != tokenizer_identity(WordTokenizer(["a", "c", "b"])).vocab_hash
    assert first.vocab_size == 3


# ---------------------------------------------------------------------------- corpora
def write_corpus(root: Path) -> None:
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("the cat sat\nthe cat ran\n")
    (root / "docs" / "skip.pyc").write_bytes(b"\x00\x01")
    (root / "records.jsonl").write_text(json.dumps({"text": "the dog sat", "id": 1}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "a cat"}]}) + "\n")
    chitchat = {"c1": {"messages": [[{"text": "hello there", "sender": "x"}, {"text": "how are you", "sender": "x"}], [{"text": "fine", "sender": "y"}]]},
                "c2": {"messages": [[{"text": "the end", "sender": "y"}]]}}  # fmt: skip
    (root / "chat.json").write_text(json.dumps(chitchat, indent=1))
    (root / "turns.json").write_text(json.dumps([[{"role": "user", "content": "q one"}, {"role": "assistant", "content": "a one"}], [{"from": "human", "value": "q two"}]]))


def test_corpus_readers(tmp_path):
    write_corpus(tmp_path)
    files = corpus_files([tmp_path / "docs", tmp_path / "records.jsonl", tmp_path / "chat.json", tmp_path / "turns.json"])
    assert [f.path.name for f in files] == ["a.txt", "records.jsonl", "chat.json", "turns.json"]
    docs = [list(iter_documents(f)) for f in files]
    assert docs[0] == ["the cat sat\nthe cat ran\n"]
    assert docs[1] == ["the dog sat", "a cat"]
    assert docs[2] == ["hello there\nhow are you", "fine", "the end"]
    assert docs[3] == ["q one", "a one", "q two"]
    assert list(documents_of({"conversations": ["x", {"value": "y"}]})) == ["x", "y"]


def test_json_streaming_across_blocks(tmp_path, monkeypatch):
    import aded.store.corpus as corpus

    monkeypatch.setattr(corpus, "_BLOCK", 7)  # every item straddles block boundaries
    items = [[{"role": "user", "content": f"turn number {i} " * 3}] for i in range(20)] + [[12345678, "x"]]
    (tmp_path / "c.json").write_text(json.dumps(items))
    docs = list(iter_documents(tmp_path / "c.json"))
    assert docs == [f"turn number {i} " * 3 for i in range(20)] + ["x"]


def test_build_datastore_end_to_end(tmp_path):
    write_corpus(tmp_path)
    words = ["<unk>", "the", "cat", "sat", "ran", "dog", "a", "hello", "there", "how", "are", "you"]
    tokenizer = WordTokenizer(words)
    out = tmp_path / "out.aded"
    store = build_datastore([tmp_path / "docs", tmp_path / "records.jsonl"], tokenizer, out, progress=False)
    assert store.stats["tokens"] == 6 + 3 + 2
    loaded = Datastore.load(out, expect=tokenizer_identity(tokenizer))
    ids, counts, total = loaded.trigram(1, 2)  # "the cat" -> sat, ran
    assert sorted(ids.tolist()) == [3, 4] and total == 2.0
    ids, _, total = loaded.bigram(2)  # "cat" -> sat, ran (and "a cat" ends its document)
    assert sorted(ids.tolist()) == [3, 4] and total == 2.0


def test_cli_info(tmp_path):
    from typer.testing import CliRunner

    from aded.cli.datastore import datastore_app

    path, _ = small_store(tmp_path)
    result = CliRunner().invoke(datastore_app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["contexts"] == 3 and info["tokenizer"]["vocab_hash"] == "abc"
    path.write_bytes(path.read_bytes()[:-5])
    result = CliRunner().invoke(datastore_app, ["info", str(path)])
    assert result.exit_code == 1
