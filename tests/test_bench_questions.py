"""The question loader: the shared prompt-set shape, multi-turn questions, and clear errors."""

from __future__ import annotations

import json

import pytest

from aded.bench.questions import QuestionError, default_questions_path, load_questions, read_questions, take


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_multi_turn_and_reference(tmp_path):
    path = write(tmp_path, "q.jsonl", [
        {"id": 1, "category": "writing", "turns": ["Write a poem.", "Now shorten it."]},
        "",
        {"id": "b", "category": "math", "turns": ["2+2?"], "reference": "4", "extra": "kept out"},
    ])
    first, second = read_questions(path)
    assert first.id == "1" and first.turns == ("Write a poem.", "Now shorten it.")
    assert first.key == "q:1" and first.reference is None
    assert second.reference == ("4",) and second.category == "math"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": 2, "turns": ["x"]}', "missing field(s) category"),
    ('{"id": 2, "category": "c", "turns": "one string"}', "turns must be a non-empty list"),
    ('{"id": 2, "category": "c", "turns": []}', "turns must be a non-empty list"),
    ('{"id": 2, "category": "c", "turns": ["ok", ""]}', "turn 2 must be a non-empty string"),
    ('{"id": 2, "category": "c", "turns": ["ok", {"role": "assistant", "content": "x"}]}', "has role 'assistant'"),
    ('{"id": 2, "category": "c", "turns": [{"role": "tool", "content": "x"}]}', "no call came before it"),
    ('{"id": 2, "category": "c", "turns": ["x"], "system": ""}', "system must be"),
    ('{"id": 2, "category": "all", "turns": ["x"]}', "category must be"),
    ('{"id": null, "category": "c", "turns": ["x"]}', "id must be"),
    ('{"id": 2, "category": "c", "turns": ["x"], "reference": 5}', "reference must be"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "bad.jsonl", [{"id": 1, "category": "c", "turns": ["fine"]}, line])
    with pytest.raises(QuestionError) as err:
        read_questions(path)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_repeated_id_and_missing_or_empty_file(tmp_path):
    path = write(tmp_path, "dup.jsonl", [{"id": 7, "category": "c", "turns": ["a"]},
                                         {"id": "7", "category": "c", "turns": ["b"]}])
    with pytest.raises(QuestionError, match="dup.jsonl:2: id '7' repeats line 1"):
        read_questions(path)
    with pytest.raises(QuestionError, match="cannot read question file"):
        read_questions(tmp_path / "absent.jsonl")
    with pytest.raises(QuestionError, match="holds no questions"):
        read_questions(write(tmp_path, "empty.jsonl", [""]))


def test_files_may_share_ids_but_not_repeat(tmp_path):
    a = write(tmp_path, "a.jsonl", [{"id": 1, "category": "x", "turns": ["a"]}])
    b = write(tmp_path, "b.jsonl", [{"id": 1, "category": "y", "turns": ["b"]}])
    assert [q.key for q in load_questions([a, b])] == ["a:1", "b:1"]
    with pytest.raises(QuestionError, match="given twice"):
        load_questions([a, a])


def test_limit_spreads_over_categories_in_file_order(tmp_path):
    rows = [{"id": i, "category": "math" if i < 5 else ("qa" if i < 8 else "rag"), "turns": ["t"]}
            for i in range(10)]
    questions = read_questions(write(tmp_path, "q.jsonl", rows))
    chosen = take(questions, 4)
    assert [q.id for q in chosen] == ["0", "1", "5", "8"]
    assert take(questions, None) == questions and len(take(questions, 50)) == 10
    with pytest.raises(ValueError, match="limit must be at least 1"):
        take(questions, 0)


def test_shipped_set_is_a_mix_with_sources():
    questions = load_questions()
    assert default_questions_path().is_file()
    categories = {q.category for q in questions}
    assert {"chat", "translation", "summarization", "qa", "math", "rag", "code", "code-edit"} == categories
    assert any(len(q.turns) > 1 for q in questions)
    for line in default_questions_path().read_text().splitlines():
        assert json.loads(line)["source"]
    assert (default_questions_path().parent / "SOURCES.md").is_file()


def test_a_session_holds_tool_results_and_a_system_prompt(tmp_path):
    path = write(tmp_path, "agent.jsonl", [{"id": "a", "category": "agent", "system": "Call tools.",
                                            "turns": ["Do it.", {"role": "tool", "content": "result"}]}])
    (question,) = read_questions(path)
    assert question.turns == ("Do it.", "result") and question.roles == ("user", "tool")
    assert question.messages(0) == [{"role": "system", "content": "Call tools."},
                                    {"role": "user", "content": "Do it."}]
    assert question.messages(1) == [{"role": "tool", "content": "result"}]


def test_the_shipped_sessions_load_by_name():
    from aded.bench.questions import load_questions

    sessions = load_questions(["sessions"])
    assert len(sessions) >= 8 and all(len(q.turns) >= 3 for q in sessions)
    assert {"edit-loop", "agent-loop"} <= {q.category for q in sessions}
    assert any("tool" in q.roles for q in sessions)
