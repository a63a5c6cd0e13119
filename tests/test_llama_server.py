"""llama.cpp's own llama-server as a benchmark peer: started on the runner's file and settings,
fed the same token ids, its prompt cache kept within a session and dropped between sessions."""

from __future__ import annotations

import pytest
from conftest import import_llama_cpp

llama_cpp = import_llama_cpp()  # fails when missing; skips only under ADED_SKIP_LLAMA=1

from gguf_models import write_tiny_gguf  # noqa: E402

from aded.backends.llama_cpp import LlamaCppRunner  # noqa: E402
from aded.bench.catalog import build_methods  # noqa: E402
from aded.bench.llama_server import BUILD_HINT, LlamaServerMethod, server_binary  # noqa: E402
from aded.bench.methods import DecodeSettings  # noqa: E402


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    runner = LlamaCppRunner(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=3),
                            n_ctx=512, n_threads=1)
    yield runner
    runner.close()


def test_a_missing_server_is_skipped_with_the_command_that_builds_it(runner, monkeypatch):
    monkeypatch.setenv("ADED_LLAMA_SERVER", "/nonexistent/llama-server")
    settings = DecodeSettings(max_new_tokens=4, eos_token_ids=(), pad_token_id=0)
    built = build_methods(["llama.cpp", "llama-server-ngram-simple"], None, runner, settings, make_budget=None)
    assert [m.name for m in built.methods] == ["llama.cpp"]
    assert built.skipped["llama-server-ngram-simple"].endswith(BUILD_HINT)
    assert "build-llama-server.sh" in BUILD_HINT


@pytest.mark.skipif(server_binary() is None, reason=BUILD_HINT)
def test_the_server_decodes_the_same_ids_and_keeps_a_sessions_prompt(runner):
    settings = DecodeSettings(max_new_tokens=16, eos_token_ids=runner.eos_token_ids, pad_token_id=0)
    baseline = build_methods(["llama.cpp"], None, runner, settings, make_budget=None).methods[0]
    server = LlamaServerMethod("llama-server-ngram-simple", runner, settings)
    try:
        prompt = list(range(500, 540)) * 2
        baseline.resume([])
        expected = baseline.run(prompt, None)
        server.resume([])
        first = server.run(prompt, expected.output_ids)
        assert first.output_ids == expected.output_ids and first.cached_tokens == 0
        assert first.prefill_s > 0 and first.decode_s > 0 and sum(first.step_lengths) == len(first.output_ids) - 1
        longer = prompt + first.output_ids + list(range(600, 610))
        server.resume(prompt + first.output_ids[:-1])
        again = server.run(longer, None)
        assert again.cached_tokens >= len(prompt)  # the session's prompt was kept
        server.resume([])  # a new session starts from nothing
        assert server.run(longer, None).cached_tokens == 0
    finally:
        server.close()
