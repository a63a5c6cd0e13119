"""The model's own answers as a corpus (issue 12, item 4): varied prompts that are not the
benchmark's, a resumable atomic answers file, and the default datastore counting the answers only
for the tokenizer they were made with."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from aded.store.answers import answer_prompts, answers_for, cached_answers_file, read_answers_header, write_answers
from aded.store.datastore import TokenizerIdentity
from aded.store.default import ANSWERS_WEIGHT, default_corpus, default_datastore_file

IDENTITY = TokenizerIdentity("tiny", 99, "ab" * 32)
OTHER = TokenizerIdentity("other", 99, "cd" * 32)


def test_prompts_are_varied_stable_and_not_the_benchmarks():
    prompts = answer_prompts(200)
    assert prompts == answer_prompts(200)  # the same corpus for everyone
    assert 150 <= len(prompts) <= 200 and len({p["id"] for p in prompts}) == len(prompts)
    categories = Counter(p["category"] for p in prompts)
    assert len(categories) >= 8 and max(categories.values()) < len(prompts) / 4
    shipped = Path(__file__).parents[1] / "src" / "aded" / "bench" / "data" / "questions.jsonl"
    questions = {t for line in shipped.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]}
    assert not questions & {p["prompt"] for p in prompts}


def test_answers_are_written_atomically_and_resume(tmp_path):
    prompts = answer_prompts(12)
    out = tmp_path / "answers.jsonl"
    asked: list[str] = []

    def generate(prompt: str) -> str:
        asked.append(prompt)
        if len(asked) == 5:
            raise KeyboardInterrupt  # interrupted after four answers (saved every 2)
        return f"answer {len(asked)}"

    header = {"model": "tiny", "tokenizer": IDENTITY.to_json(), "max_new_tokens": 8}
    with pytest.raises(KeyboardInterrupt):
        write_answers(generate, prompts, out, header, save_every=2)
    assert read_answers_header(out)["model"] == "tiny"
    assert len(out.read_text().splitlines()) == 1 + 4
    asked.clear()
    made = write_answers(lambda p: asked.append(p) or "again", prompts, out, header, save_every=2)
    assert made == len(prompts) - 4 and len(asked) == made  # the four saved ones were not asked again
    records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert [r["id"] for r in records] == [p["id"] for p in prompts] and all(r["text"] for r in records)
    # another model's header: nothing is reused
    assert write_answers(lambda p: "x", prompts, out, {**header, "model": "other"}) == len(prompts)


def test_the_default_corpus_counts_answers_only_for_their_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    path = cached_answers_file(IDENTITY)
    path.parent.mkdir(parents=True)
    write_answers(lambda p: "hello", answer_prompts(4), path,
                  {"model": "tiny", "tokenizer": IDENTITY.to_json(), "max_new_tokens": 8})
    assert answers_for(IDENTITY) == path and answers_for(OTHER) is None
    with_answers = default_corpus(IDENTITY)
    assert sum(f.path == path for f in with_answers) == ANSWERS_WEIGHT
    assert all(f.path != path for f in default_corpus(OTHER))
    before = default_datastore_file(IDENTITY)
    write_answers(lambda p: "changed", answer_prompts(4), path,
                  {"model": "tiny2", "tokenizer": IDENTITY.to_json(), "max_new_tokens": 8})
    assert default_datastore_file(IDENTITY) != before  # new answers, a new default datastore
    path.write_text("not an answers file\n")
    assert answers_for(IDENTITY) is None  # unreadable: ignored, the datastore builds without it


def test_the_answers_command_refuses_a_bad_prompt_file(tmp_path):
    from typer.testing import CliRunner

    from aded.cli import app

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"id": 1, "category": "chat", "turns": ["ok"]}\n{"id": 2, "category": "chat"}\n')
    result = CliRunner().invoke(app, ["datastore", "answers", "--prompts", str(bad), "--out", str(tmp_path / "a.jsonl")])
    message = " ".join(result.output.split())
    assert result.exit_code != 0 and "missing field(s) turns" in message and "Traceback" not in message
