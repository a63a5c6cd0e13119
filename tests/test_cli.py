"""The `aded` command on a tiny model saved to a folder: JSON output, stdin, chat, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hf_greedy, tiny_llama, tiny_tokenizer

ADED = Path(sys.executable).with_name("aded")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=99, seed=2).float()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run(*args, stdin=None):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "ADED_CACHE_DIR": str(Path(__file__).parent / ".cache-tests")}
    if "PYTHONPATH" in os.environ:  # a checkout run against another install's console script
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([str(ADED), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_generate_json_equals_greedy(model_dir):
    import aded

    lm = aded.load(str(model_dir), drafter="none", budget="off")
    proc = run("generate", "--json", "--model", model_dir, "--budget", "off", "-n", 20, "abcabcabc")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["prompt_token_ids"] == lm.prompt_ids("abcabcabc")
    assert data["token_ids"] == hf_greedy(lm.model, data["prompt_token_ids"], 20)
    assert "Warning" not in proc.stderr  # e.g. transformers' FutureWarning on a deprecated argument


def test_prompt_from_stdin_and_file_agree(model_dir, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("hello there")
    a = run("generate", "--json", "--model", model_dir, "--budget", "off", "-n", 8, "-", stdin="hello there")
    b = run("generate", "--json", "--model", model_dir, "--budget", "off", "-n", 8, "-f", prompt_file)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_prompt_file_dash_reads_stdin(model_dir):
    positional = run("generate", "--json", "--model", model_dir, "--budget", "off", "-n", 8, "-", stdin="hello there")
    option = run("generate", "--json", "--model", model_dir, "--budget", "off", "-n", 8, "--prompt-file", "-",
                 stdin="hello there")
    assert positional.returncode == option.returncode == 0, positional.stderr + option.stderr
    assert json.loads(option.stdout)["prompt_token_ids"] == json.loads(positional.stdout)["prompt_token_ids"]
    assert json.loads(option.stdout)["token_ids"] == json.loads(positional.stdout)["token_ids"]


def test_chat_streams_replies_turn_after_turn(model_dir):
    proc = run("chat", "--model", model_dir, "--budget", "off", "-n", 6, stdin="hi\nmore\n\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 2


@pytest.mark.parametrize("args,message", [
    (("--temperature", "-1"), "--temperature must be >= 0"),
    (("--top-p", "2"), "top_p must be in (0, 1]"),
    (("--drafter", "nope"), "unknown drafter 'nope'"),
    (("--dtype", "int3"), "unknown dtype 'int3'"),
])
def test_bad_parameters_are_one_clear_line(model_dir, args, message):
    proc = run("generate", "--model", model_dir, "--budget", "off", *args, "hi")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_prompt_is_explained(model_dir):
    proc = run("generate", "--model", model_dir)
    assert proc.returncode == 2 and "no prompt" in proc.stderr


def test_drafters_lists_every_source_with_what_it_does():
    from aded.drafters import DEFAULT_DRAFTERS, DRAFTERS

    proc = run("drafters")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == set(DRAFTERS)
    assert "(default on llama.cpp)" in lines[DEFAULT_DRAFTERS["llama.cpp"]]
    assert "(default on hf)" in lines[DEFAULT_DRAFTERS["hf"]]
    assert sum("(default on" in line for line in lines.values()) == len(set(DEFAULT_DRAFTERS.values()))
    assert "Monte Carlo tree search" in lines["aded"] and "Proposes nothing" in lines["none"]
    assert "Traceback" not in proc.stderr


def test_state_carries_what_the_drafter_learned_from_one_run_to_the_next(model_dir, tmp_path):
    state = tmp_path / "learned.npz"
    args = ("generate", "--model", model_dir, "--budget", "off", "--drafter", "suffix", "--state", state, "--json")
    first = run(*args, "abc abc abc")
    assert first.returncode == 0, first.stderr
    assert "no state in learned.npz yet" in first.stderr and state.exists()
    second = run(*args, "abc abc abc")
    assert second.returncode == 0 and "loaded learned state from learned.npz" in second.stderr
    assert json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]
    other = run("generate", "--model", model_dir, "--drafter", "pld", "--state", state, "hi")
    assert other.returncode == 2 and "'suffix' drafter, not 'pld'" in other.stderr and "Traceback" not in other.stderr
    state.write_bytes(b"not a state file")
    third = run(*args, "abc")
    assert third.returncode == 0 and "corrupt state set aside" in third.stderr
    assert state.exists() and list(tmp_path.glob("learned.npz.corrupt-*"))  # a fresh file, the bad one kept
    missing = run(*args[:-3], "--state", tmp_path / "no" / "such.npz", "abc")
    assert missing.returncode == 2 and "directory does not exist" in missing.stderr
