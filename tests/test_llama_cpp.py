"""The llama.cpp backend on tiny random GGUF files: the runner protocol, lossless trees through
sequence ids, every drafter equal to llama.cpp's own greedy decoding, exact sampling, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import import_llama_cpp

llama_cpp = import_llama_cpp()  # fails when missing; skips only under ADED_SKIP_LLAMA=1

from distribution import assert_follows  # noqa: E402
from gguf_models import write_tiny_gguf  # noqa: E402
from trees import tree_of  # noqa: E402

from aded.api import Aded  # noqa: E402
from aded.backends.base import Runner  # noqa: E402
from aded.backends.llama_cpp import LlamaCppRunner, tree_sequences  # noqa: E402
from aded.budget import CostAwareBudget, VerifyAll  # noqa: E402
from aded.decoding import GenerationConfig, SpeculativeDecoder  # noqa: E402
from aded.drafters import make_drafter  # noqa: E402
from aded.drafters.base import Drafter, NoDrafter  # noqa: E402
from aded.tree import DraftTree, TreeBuilder  # noqa: E402
from aded.verify import Sampling, warp  # noqa: E402

N_CTX = 1024


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=3)


@pytest.fixture(scope="module")
def runner(tiny_path):
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, max_leaves=4)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference_llm(tiny_path):
    """llama-cpp-python's own `Llama`, as a user runs it: the reference for greedy output."""
    return llama_cpp.Llama(model_path=str(tiny_path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1,
                           verbose=False)


def llama_greedy(llm, prompt: list[int], max_new: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) >= max_new:
            break
    return out


def decoder(runner, drafter, budget=None):
    return SpeculativeDecoder(runner, drafter, (), budget or VerifyAll())


class ScriptedDrafter(Drafter):
    """Wide random trees mixing the true continuation (to a random depth) with wrong tokens."""

    name = "scripted"

    def __init__(self, reference, prompt_len, seed, vocab, paths=6):
        self.reference, self.prompt_len, self.vocab, self.paths = reference, prompt_len, vocab, paths
        self.rng = np.random.default_rng(seed)

    def propose(self, context_ids, max_nodes):
        truth = self.reference[len(context_ids) - self.prompt_len:]
        builder = TreeBuilder(max_nodes)
        for _ in range(int(self.rng.integers(0, self.paths + 1))):
            depth = int(self.rng.integers(1, 7))
            keep = int(self.rng.integers(0, min(depth, len(truth)) + 1))
            builder.add_path(truth[:keep] + self.rng.integers(0, self.vocab, depth - keep).tolist())
        return builder.build()


def test_runner_speaks_the_protocol(runner):
    assert isinstance(runner, Runner)
    assert runner.backend == "llama.cpp" and runner.max_positions == N_CTX
    assert runner.max_tree_leaves == 4
    assert 2 in runner.eos_token_ids  # <|im_end|>, where llama.cpp's own generation ends


def test_cached_costs_are_keyed_by_the_builds_instruction_set(runner):
    """Two wheels of one llama-cpp-python version (AVX2, AVX-512) differ in t(k) and exactness."""
    features = runner.cpu_features()
    assert features and " " not in features and "=" not in features
    assert features in runner.cost_identity()
    assert runner.describe()["cpu_features"] == features


def test_default_runner_verifies_one_path_and_stays_greedy(tiny_path, reference_llm):
    chain_runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1)
    try:
        assert chain_runner.max_tree_leaves == 1  # exactness on real models (see the runner's doc)
        prompt = list(range(400, 420)) * 2
        reference = llama_greedy(reference_llm, prompt, 40)
        drafter = ScriptedDrafter(reference, len(prompt), 5, chain_runner.vocab_size, paths=5)
        result = decoder(chain_runner, drafter).generate(prompt, GenerationConfig(max_new_tokens=40))
        assert result.token_ids == reference
        assert result.stats.mean_accepted_tokens > 1.0
    finally:
        chain_runner.close()


def test_tree_sequences_give_each_leaf_a_path():
    tree = tree_of([[5, 6, 7], [5, 8], [9]])
    seqs, keep = tree_sequences(tree)
    leaves = tree.leaves()
    assert sorted(s for leaf in leaves for s in seqs[leaf]) == list(range(len(leaves)))
    for node in range(len(tree)):
        below = [leaf for leaf in leaves if node in tree.path_to(leaf)]
        assert seqs[node] == sorted(seqs[leaf][0] for leaf in below)
        assert keep[node] in seqs[node]


def test_plain_decoding_is_llama_cpp_greedy(runner, reference_llm):
    rng = np.random.default_rng(0)
    for _ in range(3):
        prompt = rng.integers(3, runner.vocab_size, 20).tolist()
        result = decoder(runner, NoDrafter()).generate(prompt, GenerationConfig(max_new_tokens=40))
        assert result.token_ids == llama_greedy(reference_llm, prompt, 40)


def test_tree_logits_match_sequential_logits(runner):
    prompt = list(range(100, 130))
    tree = tree_of([[7, 8, 9], [7, 11], [12, 13]])
    seq = runner.new_sequence(64)
    runner.prefill(seq, prompt)
    logits = runner.verify(seq, 55, tree)
    for node in range(len(tree)):
        fresh = runner.new_sequence(64)
        expected = runner.prefill(fresh, prompt + [55] + tree.path_tokens(node)).logits
        assert torch.allclose(logits[node + 1], expected, atol=1e-2, rtol=1e-3)
        assert int(logits[node + 1].argmax()) == int(expected.argmax())


def test_commit_keeps_exactly_the_accepted_path(runner):
    prompt = list(range(200, 240))
    tree = tree_of([[7, 8, 9], [7, 11], [12, 13, 14]])
    for accepted in [(), (0,), (0, 3), (4, 5, 6), (0, 1, 2)]:
        seq = runner.new_sequence(64)
        runner.prefill(seq, prompt)
        runner.verify(seq, 55, tree)
        runner.commit(seq, accepted)
        path = [int(tree.token_ids[i]) for i in accepted]
        after = runner.verify(seq, 77, DraftTree.empty())[0]
        fresh = runner.new_sequence(64)
        expected = runner.prefill(fresh, prompt + [55] + path + [77]).logits
        assert torch.allclose(after, expected, atol=1e-2, rtol=1e-3), accepted


@pytest.mark.parametrize("drafter_name", ["none", "pld", "suffix", "hybrid", "aded"])
def test_every_drafter_equals_llama_cpp_greedy(runner, reference_llm, drafter_name):
    rng = np.random.default_rng(1)
    for trial in range(3):
        base = rng.integers(3, runner.vocab_size, 10).tolist()
        prompt = base * 3 if trial % 2 else rng.integers(3, runner.vocab_size, 30).tolist()
        reference = llama_greedy(reference_llm, prompt, 48)
        result = decoder(runner, make_drafter(drafter_name)).generate(
            prompt, GenerationConfig(max_new_tokens=48))
        assert result.token_ids == reference


@pytest.mark.parametrize("seed", range(6))
def test_wide_random_trees_are_pruned_to_the_sequences_and_stay_greedy(runner, reference_llm, seed):
    prompt = np.random.default_rng(seed).integers(3, runner.vocab_size, 25).tolist()
    reference = llama_greedy(reference_llm, prompt, 30)
    drafter = ScriptedDrafter(reference, len(prompt), seed, runner.vocab_size, paths=8)
    for budget in (VerifyAll(), CostAwareBudget()):
        result = decoder(runner, drafter, budget).generate(
            prompt, GenerationConfig(max_new_tokens=30, max_draft_nodes=24))
        assert result.token_ids == reference


def test_a_tree_wider_than_the_sequences_is_refused_not_half_run(runner):
    seq = runner.new_sequence(64)
    runner.prefill(seq, [5, 6, 7])
    wide = tree_of([[t] for t in range(10, 16)])  # 6 leaves, 4 sequences
    with pytest.raises(ValueError, match="leaves"):
        runner.verify(seq, 8, wide)
    narrowed = VerifyAll().plan(wide, runner.max_tree_leaves)
    assert len(narrowed.leaves()) == 4
    runner.verify(seq, 8, narrowed)  # the sequence is still usable


def test_prompt_longer_than_the_context_is_a_clear_error(runner):
    with pytest.raises(ValueError, match="context"):
        decoder(runner, NoDrafter()).generate(list(range(5, 5 + N_CTX + 10)),
                                              GenerationConfig(max_new_tokens=4))


def test_generation_stops_at_the_context_limit(runner, reference_llm):
    prompt = list(range(300, 300 + N_CTX - 20))
    result = decoder(runner, make_drafter("pld")).generate(prompt, GenerationConfig(max_new_tokens=100))
    assert result.finish_reason == "length" and len(result.token_ids) == 20


def test_a_file_llama_cpp_cannot_load_is_a_clear_error(tmp_path):
    import aded
    from aded.models import ModelError

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError):
        aded.load(str(bad), backend="llama.cpp")


def test_aded_api_on_a_runner(runner):
    from aded.models import load_tokenizer

    lm = Aded(runner, load_tokenizer("smollm2-135m-instruct"), budget="off")  # drafter="auto"
    assert lm.backend == "llama.cpp" and lm.model is None and lm.drafter.name == "suffix"
    out = lm.generate("Say hi", max_new_tokens=12)
    assert out.token_ids and out.stats.steps >= 1


# ---------------------------------------------------------------------------- sampling
PROMPT = [10, 20, 30, 40]
SAMPLING = Sampling(4.0, top_k=4)


def _exact(runner, sampling):
    seq = runner.new_sequence(16)
    first = warp(runner.prefill(seq, PROMPT).logits, sampling)
    support = torch.nonzero(first).flatten().tolist()
    joint = {}
    for t1 in support:
        second = warp(runner.prefill(runner.new_sequence(16), PROMPT + [t1]).logits, sampling)
        for t2 in torch.nonzero(second).flatten().tolist():
            joint[(t1, t2)] = first[t1].item() * second[t2].item()
    return joint


class FixedTreeDrafter(Drafter):
    name = "fixed"

    def __init__(self, paths):
        self.tree = tree_of(paths)

    def propose(self, context_ids, max_nodes):
        return self.tree


@pytest.mark.parametrize("with_tree", [False, True], ids=["no-drafts", "tree"])
def test_sampled_two_token_distribution_is_the_models(runner, with_tree):
    expected = _exact(runner, SAMPLING)
    firsts = sorted({a for a, _ in expected}, key=lambda a: -sum(p for (x, _), p in expected.items() if x == a))
    seconds = sorted((p, b) for (a, b), p in expected.items() if a == firsts[0])[::-1]
    paths = [[firsts[0], seconds[0][1]], [firsts[0], seconds[-1][1]], [firsts[1], 3], [firsts[-1]]]
    drafter = FixedTreeDrafter(paths) if with_tree else NoDrafter()
    dec = decoder(runner, drafter)
    config = dict(max_new_tokens=2, do_sample=True, temperature=SAMPLING.temperature, top_k=SAMPLING.top_k)
    samples = [tuple(dec.generate(PROMPT, GenerationConfig(seed=seed, **config)).token_ids)
               for seed in range(1500)]
    assert_follows(samples, expected)


# ---------------------------------------------------------------------------- choosing a backend
def test_auto_takes_llama_cpp_for_gguf_and_hf_for_folders(tiny_path, tmp_path):
    from aded.backends.select import choose_backend
    from aded.models import ModelError

    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert choose_backend(str(tiny_path)) == "llama.cpp"
    assert choose_backend("smollm2-135m-instruct") == "llama.cpp"
    assert choose_backend(str(tiny_path), "hf") == "hf"
    assert choose_backend(str(folder)) == "hf"
    with pytest.raises(ModelError, match="GGUF"):
        choose_backend(str(folder), "llama.cpp")
    with pytest.raises(ModelError, match="unknown backend"):
        choose_backend(str(tiny_path), "vulkan")


def test_cli_generates_on_a_tiny_gguf(tiny_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    aded_cli = Path(sys.executable).with_name("aded")
    proc = subprocess.run([str(aded_cli), "generate", "--json", "--model", str(tiny_path), "--backend", "llama.cpp",
                           "--budget", "off", "-n", "12", "--no-chat", "abc abc abc"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["token_ids"]) == 12 and data["stats"]["steps"] >= 1


def test_exact_chain_length_is_measured_and_respected(tiny_path, reference_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    measured = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1)  # probes, then caches
    try:
        # F32 weights are not repacked: every batch row is computed as one-token decoding does
        assert measured.max_tree_nodes is None
        assert (tmp_path / "exact-chains.json").is_file()
    finally:
        measured.close()
    capped = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, max_nodes=2)
    try:
        prompt = list(range(500, 515)) * 3
        reference = llama_greedy(reference_llm, prompt, 40)
        drafter = ScriptedDrafter(reference, len(prompt), 9, capped.vocab_size, paths=3)
        result = decoder(capped, drafter).generate(prompt, GenerationConfig(max_new_tokens=40))
        assert result.token_ids == reference
        assert max(result.stats.accepted_lengths) <= 3  # two nodes and the bonus token
        seq = capped.new_sequence(32)
        capped.prefill(seq, [5, 6, 7])
        with pytest.raises(ValueError, match="exactly"):
            capped.verify(seq, 8, DraftTree.chain([9, 10, 11]))
    finally:
        capped.close()


def test_a_new_sequence_keeps_the_prefix_it_shares_with_the_last_one(tiny_path, reference_llm, tmp_path,
                                                                      monkeypatch):
    """A chat's next turn runs only its new tokens, and its answer and logits are a fresh run's."""
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    reusing = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1)  # probes, then caches
    fresh = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, reuse_prefix=False)
    try:
        assert reusing.reuse_prefix and not fresh.reuse_prefix
        rng = np.random.default_rng(4)
        prompt = rng.integers(3, reusing.vocab_size, 30).tolist()
        history = []
        for turn in range(3):  # each turn: the last prompt, its answer and a new message
            prompt = prompt + history + rng.integers(3, reusing.vocab_size, 10).tolist()
            reference = llama_greedy(reference_llm, prompt, 30)
            drafter = ScriptedDrafter(reference, len(prompt), turn, reusing.vocab_size, paths=3)
            result = decoder(reusing, drafter).generate(prompt, GenerationConfig(max_new_tokens=30))
            assert result.token_ids == reference
            # the answer's last token was emitted, never run: it is the first one computed again
            assert result.stats.cached_prompt_tokens == (len(prompt) - 10 - 1 if turn else 0)
            history = result.token_ids
        resumed = reusing.prefill(reusing.new_sequence(0), prompt + history).logits
        assert torch.equal(resumed, fresh.prefill(fresh.new_sequence(0), prompt + history).logits)

        seq = reusing.new_sequence(0)  # a prompt that parts at position 12 keeps 12
        assert reusing.prefill(seq, prompt[:12] + [7] + prompt[13:]).reused == 12
        reusing.verify(seq, 9, DraftTree.chain([10, 11]))
        reusing.commit(seq, (0,))
        reusing.rewind(seq, 20)  # what was taken back is not kept
        assert reusing.prefill(reusing.new_sequence(0), prompt[:12] + [7] + prompt[13:] + [9, 10, 11]).reused == 20
        # the same prompt: all but its last
        assert reusing.prefill(reusing.new_sequence(0), prompt[:5]).reused == 4
        assert reusing.prefill(reusing.new_sequence(0), [8] + prompt).reused == 0
    finally:
        reusing.close()
        fresh.close()


def test_a_finished_sequence_holds_what_plain_decoding_would(tiny_path, reference_llm):
    """A chain accepted through a stop token wrote cells plain decoding never ran; the loop takes
    them back, so the next turn keeps exactly the prefix llama-cpp-python's `generate` keeps."""
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1)
    try:
        prompt = np.random.default_rng(5).integers(3, runner.vocab_size, 30).tolist()
        reference = llama_greedy(reference_llm, prompt, 40)
        first = next(i for i in range(3, 40) if reference.index(reference[i]) == i) + 1
        stop = reference[first - 1]  # a token plain decoding first emits as its `first`-th
        assert first + 3 < len(reference)

        class Whole(Drafter):  # the rest of the answer as one chain: accepted past the stop
            name = "whole"

            def propose(self, context_ids, max_nodes):
                return DraftTree.chain(reference[len(context_ids) - len(prompt):][:max_nodes])

        result = decoder(runner, Whole()).generate(prompt, GenerationConfig(max_new_tokens=40,
                                                                            stop_token_ids=[stop]))
        assert result.token_ids == reference[:first]
        kept = runner.prefill(runner.new_sequence(0), prompt + result.token_ids + [9, 10]).reused
        assert kept == len(prompt) + first - 1
    finally:
        runner.close()


def test_a_conversation_equals_llama_cpp_keeping_its_prompt_cache(tiny_path, reference_llm):
    """Turn after turn, aded (drafting, keeping prefixes) and llama-cpp-python's `generate` (its
    own prefix match, no reset) give the same tokens and keep the same number of prompt tokens."""
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1)
    try:
        rng = np.random.default_rng(9)
        reference_llm.reset()
        prompt, answer = [], []
        for turn in range(3):
            prompt = prompt + answer + rng.integers(3, runner.vocab_size, 12).tolist()
            held = len(reference_llm._input_ids)
            expected = []
            for token in reference_llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
                expected.append(int(token))
                if len(expected) >= 20:
                    break
            drafter = ScriptedDrafter(expected, len(prompt), turn, runner.vocab_size, paths=3)
            result = decoder(runner, drafter).generate(prompt, GenerationConfig(max_new_tokens=20))
            assert result.token_ids == expected
            assert result.stats.cached_prompt_tokens == (min(held, len(prompt) - 1) if turn else 0)
            answer = result.token_ids
    finally:
        runner.close()


def test_the_server_reports_a_kept_prompt_only_where_no_other_client_could_read_it(tiny_path):
    """OpenAI's `usage.prompt_tokens_details.cached_tokens` counts what a conversation's next turn
    kept. With one key it is reported; with several keys the one prompt cache passes between
    clients, and a count would tell one client that another ran in between, so it reads 0."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx
    from server_support import post, serve_in_thread

    import aded
    from aded.server.app import ServerConfig, create_app

    lm = aded.load(str(tiny_path), drafter="suffix", budget="off", backend="llama.cpp")
    conversation = [{"role": "user", "content": "Count to five."}]

    def turn(url, key, messages):
        reply = post(url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 8,
                                                  "temperature": 0, "ignore_eos": True},
                     headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        return body["usage"], [*messages, body["choices"][0]["message"], {"role": "user", "content": "Again."}]

    with serve_in_thread(create_app(lm, ServerConfig(model_name="tiny", api_keys=("key-a",)))) as url:
        first, later = turn(url, "key-a", conversation)
        second, _ = turn(url, "key-a", later)
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer key-a"}).text
    kept = second["prompt_tokens_details"]["cached_tokens"]
    assert f"aded_prompt_tokens_cached_total {kept}" in metrics
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert 0 < kept < second["prompt_tokens"]

    lm.forget_cache()
    config = ServerConfig(model_name="tiny", api_keys=("key-a", "key-b"))
    with serve_in_thread(create_app(lm, config)) as url:
        usages = []
        for key in ("key-a", "key-a", "key-b", "key-a"):
            usage, conversation = turn(url, key, conversation)
            usages.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert usages == [0, 0, 0, 0]


def test_longer_exact_chains_win_the_layout_only_where_rows_are_cheap():
    from aded.backends.select import predicted_speed
    from aded.budget import CostModel

    cheap = CostModel((0, 2, 4, 8), (1.0, 1.2, 1.4, 1.8))
    assert predicted_speed(None, cheap) > predicted_speed(2, cheap) > predicted_speed(0, cheap) == 1.0
    steep = CostModel((0, 1, 2, 4, 6), (1.0, 1.9, 2.4, 3.4, 4.4))
    assert predicted_speed(6, steep, acceptance=0.5) == 1.0  # no chain pays: plain decoding's speed


def test_the_layout_is_chosen_once_and_kept_where_nothing_is_repacked(tiny_path, tmp_path, monkeypatch):
    import aded.backends.llama_cpp as backend
    from aded.backends.select import choose_repack

    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    assert choose_repack(tiny_path, threads=1) is True  # F32: exact at any length as llama.cpp loads it
    kept = json.loads((tmp_path / "repack-choice.json").read_text())
    (choice,) = kept.values()
    assert choice["repack"] is True and choice["on"]["max_tree_nodes"] is None and "off" not in choice

    def no_loading(*args, **kwargs):
        raise AssertionError("the cached choice should not load the model")

    monkeypatch.setattr(backend, "LlamaCppRunner", no_loading)
    assert choose_repack(tiny_path, threads=1) is True


def test_weights_not_repacked_still_decode_as_llama_cpp(tiny_path, reference_llm):
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, repack=False)
    try:
        assert runner.describe()["repack"] is False and "repack=0" in runner.cost_identity()
        prompt = list(range(400, 430))
        result = decoder(runner, make_drafter("pld")).generate(prompt, GenerationConfig(max_new_tokens=24))
        assert result.token_ids == llama_greedy(reference_llm, prompt, 24)
        from aded.bench.methods import DecodeSettings, LlamaCppGenerate

        baseline = LlamaCppGenerate("llama.cpp", runner, DecodeSettings(24, (), 0))  # the bench's, same layout
        assert baseline.llm.model_params.use_extra_bufts is False
        assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # llama.cpp's own default is back
        assert baseline.run(prompt, None).output_ids == result.token_ids
    finally:
        runner.close()
