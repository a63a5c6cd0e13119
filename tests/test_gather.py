"""Several requests at once on one llama.cpp context (backends/gather.py): their steps share
`llama_decode` calls, each request's rows under its own sequence id, and every request's output is
its solo greedy output, token for token, whatever runs beside it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import import_llama_cpp

llama_cpp = import_llama_cpp()  # fails when missing; skips only under ADED_SKIP_LLAMA=1

from gguf_models import default_gguf, write_tiny_gguf  # noqa: E402

from aded.backends.base import Runner  # noqa: E402
from aded.backends.gather import Gather, GatherCancelled, GatheredBudget  # noqa: E402
from aded.backends.llama_cpp import LlamaCppRunner  # noqa: E402
from aded.budget import CostAwareBudget, CostModel, VerifyAll  # noqa: E402
from aded.decoding import GenerationConfig, SpeculativeDecoder  # noqa: E402
from aded.drafters import make_drafter  # noqa: E402
from aded.drafters.base import NoDrafter  # noqa: E402
from aded.tree import DraftTree  # noqa: E402

N_CTX = 512  # per slot
N_BATCH = 64  # small, so that prompts span several chunks in milliseconds


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=5)


@pytest.fixture(scope="module")
def solo(tiny_path):
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, n_batch=N_BATCH)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def slotted(tiny_path):
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, n_batch=N_BATCH, slots=4)
    yield runner
    runner.close()


def plain(runner, prompt, config):
    """The solo greedy reference: plain decoding (drafter none), the runner's cache forgotten."""
    runner.forget()
    return SpeculativeDecoder(runner, NoDrafter(), runner.eos_token_ids, VerifyAll()).generate(prompt, config)


def prompts_for(vocab: int, seed: int) -> list[list[int]]:
    """Prompts of different lengths, some repetitive (drafters find something to propose), one
    longer than the batch."""
    rng = np.random.default_rng(seed)
    base = rng.integers(3, vocab, 12).tolist()
    return [base * 3,
            rng.integers(3, vocab, 9).tolist(),
            (base + rng.integers(3, vocab, 5).tolist()) * 12,  # 204 tokens: four chunks of 64
            rng.integers(3, vocab, 30).tolist() * 2]


def run_concurrently(gather, jobs, stagger_s=0.0, budget=None):
    """Each job (prompt, config, drafter name) in its own thread through a gathered session, with
    `budget()` (default: the solo cost-aware budget)."""
    results: list = [None] * len(jobs)
    errors: list = []

    def client(i, prompt, config, name):
        try:
            time.sleep(stagger_s * i)
            with gather.session(prompt) as view:
                decoder = SpeculativeDecoder(view, make_drafter(name), view.eos_token_ids,
                                             budget() if budget else CostAwareBudget())
                results[i] = decoder.generate(prompt, config)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_a_slotted_runner_decodes_each_slot_bit_for_bit_as_a_solo_runner(solo, slotted):
    """Rows of three slots in one decode (a prompt chunk beside two chains) are each the rows a
    one-slot runner computes for that sequence alone."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, solo.vocab_size, n).tolist() for n in (40, 100, 7)]
    chains = [rng.integers(3, solo.vocab_size, k).tolist() for k in (5, 1, 3)]
    expected = []
    for prompt, chain in zip(prompts, chains):
        solo.forget()
        seq = solo.new_sequence(0)
        first = solo.prefill(seq, prompt).logits
        expected.append((first, solo.verify(seq, 11, DraftTree.chain(chain))))
    slotted.forget()
    seqs = [slotted.new_sequence(0, slot=s) for s in (2, 0, 1)]
    got_first = [None] * 3
    got_first[0] = slotted.prefill(seqs[0], prompts[0]).logits  # slot 2 alone
    ids1, _ = slotted.start_prefill(seqs[1], prompts[1])
    ids2, _ = slotted.start_prefill(seqs[2], prompts[2])
    # slot 0's first chunk beside slot 1's whole prompt and slot 2's chain
    out = slotted.decode_parts([slotted.prefill_part(seqs[1], ids1[:50], False),
                                slotted.prefill_part(seqs[2], ids2, True),
                                slotted.verify_part(seqs[0], 11, DraftTree.chain(chains[0]))])
    got_first[2] = out[1][0]
    rows0 = out[2]
    out = slotted.decode_parts([slotted.prefill_part(seqs[1], ids1[50:], True),
                                slotted.verify_part(seqs[2], 11, DraftTree.chain(chains[2]))])
    got_first[1] = out[0][0]
    rows2 = out[1]
    rows1 = slotted.verify(seqs[1], 11, DraftTree.chain(chains[1]))
    for i, rows in enumerate((rows0, rows1, rows2)):
        assert torch.equal(got_first[i], expected[i][0]), i
        assert torch.equal(rows, expected[i][1]), i


def test_slots_are_independent_sequences_with_their_own_prompt_cache(slotted):
    slotted.forget()
    a, b = slotted.new_sequence(0, slot=0), slotted.new_sequence(0, slot=1)
    slotted.prefill(a, list(range(100, 140)))
    slotted.prefill(b, list(range(300, 320)))
    slotted.rewind(b, 10)  # slot 1's rewind leaves slot 0 alone
    assert slotted.cached_prefix(list(range(100, 140)), 0) == 40
    assert slotted.cached_prefix(list(range(300, 320)), 1) == 10
    assert slotted.prefill(slotted.new_sequence(0, slot=0), list(range(100, 150))).reused == 40
    assert slotted.prefill(slotted.new_sequence(0, slot=1), list(range(300, 330))).reused == 10
    with pytest.raises(ValueError, match="slot"):
        slotted.new_sequence(0, slot=4)


def test_several_slots_take_chains_only(tiny_path):
    with pytest.raises(ValueError, match="max_leaves"):
        LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, slots=2, max_leaves=4)


def test_four_threads_with_drafters_equal_their_solo_greedy_output(solo, slotted):
    """Requests of different lengths, starting and ending at different times, each with its own
    drafter, every one equal to plain decoding of its prompt alone; and they did share decodes."""
    with Gather(slotted) as gather:
        prompts = prompts_for(solo.vocab_size, 1)
        news = (40, 25, 60, 33)
        drafters = ("pld", "suffix", "pld", "suffix")
        configs = [GenerationConfig(max_new_tokens=n) for n in news]
        expected = [plain(solo, p, c).token_ids for p, c in zip(prompts, configs)]
        got = run_concurrently(gather, list(zip(prompts, configs, drafters)), stagger_s=0.01)
        for i, result in enumerate(got):
            assert result.token_ids == expected[i], i
        assert any(r.stats.mean_accepted_tokens > 1.0 for r in got)  # the drafters did draft
        stats = gather.stats
        assert stats.parts > stats.decodes  # several requests in a decode
        assert stats.prefill_rows == sum(len(p) for p in prompts)


def test_the_gathered_budget_prices_a_step_at_its_share_and_stays_exact(solo, slotted):
    costs = CostModel((0, 1, 2, 4), (0.010, 0.018, 0.023, 0.032))
    with Gather(slotted) as gather:
        budget = gather.budget(costs)
        assert isinstance(budget, GatheredBudget) and isinstance(gather.budget(None), VerifyAll)
        assert np.allclose(budget.step_costs(4), costs.upto(4))  # alone: the solo curve
        gather.sharing = 4.0
        assert np.allclose(budget.step_costs(4), costs.upto(4) - 0.010 + 0.0025)
        gather.sharing = 1.0
        prompts = prompts_for(solo.vocab_size, 6)
        configs = [GenerationConfig(max_new_tokens=30)] * 4
        expected = [plain(solo, p, c).token_ids for p, c in zip(prompts, configs)]
        got = run_concurrently(gather, [(p, c, "suffix") for p, c in zip(prompts, configs)],
                               budget=lambda: gather.budget(costs))
        assert [r.token_ids for r in got] == expected


def test_more_requests_than_slots_wait_for_one_and_stay_exact(solo, tiny_path):
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, n_batch=N_BATCH, slots=2)
    with Gather(runner) as gather:
        prompts = prompts_for(solo.vocab_size, 2) + prompts_for(solo.vocab_size, 3)[:2]
        configs = [GenerationConfig(max_new_tokens=20 + 5 * i) for i in range(len(prompts))]
        expected = [plain(solo, p, c).token_ids for p, c in zip(prompts, configs)]
        got = run_concurrently(gather, [(p, c, "suffix") for p, c in zip(prompts, configs)])
        assert [r.token_ids for r in got] == expected
        assert gather.free_slots == 2
        blocker = gather.session()
        other = gather.session()
        with pytest.raises(TimeoutError):
            gather.session(timeout=0.05)
        blocker.close()
        with gather.session(timeout=1.0) as again:
            assert again.slot == blocker.slot
        other.close()
        runner.close()


def test_runs_exact_where_only_short_batches_are_exact(solo, tiny_path):
    """A runner capped at two drafted nodes (as repacked weights are): decodes carry at most three
    verification rows, prompt chunks run alone, and outputs still equal solo decoding."""
    runner = LlamaCppRunner(tiny_path, n_ctx=N_CTX, n_threads=1, n_batch=N_BATCH, slots=3, max_nodes=2)
    with Gather(runner) as gather:
        assert gather.exact_rows == 3
        prompts = prompts_for(solo.vocab_size, 4)[:3]
        configs = [GenerationConfig(max_new_tokens=30)] * 3
        expected = [plain(solo, p, c).token_ids for p, c in zip(prompts, configs)]
        got = run_concurrently(gather, [(p, c, "pld") for p, c in zip(prompts, configs)])
        assert [r.token_ids for r in got] == expected
        runner.close()


def test_a_session_is_a_runner_bound_to_its_slot(slotted):
    with Gather(slotted) as gather:
        with gather.session() as view:
            assert isinstance(view, Runner)
            assert view.max_tree_leaves == 1 and view.max_positions == N_CTX
            assert view.cost_identity() == slotted.cost_identity()
            with pytest.raises(ValueError, match="slot"):
                view.prefill(slotted.new_sequence(0, slot=(view.slot + 1) % 4), [5, 6])


def test_a_cancelled_prefill_stops_within_a_chunk_and_frees_its_slot(solo, slotted):
    with Gather(slotted) as gather:
        rng = np.random.default_rng(7)
        long_prompt = rng.integers(3, solo.vocab_size, 480).tolist()  # 8 chunks of 64
        outcome = {}
        view = gather.session(long_prompt, owner="a")

        def client():
            try:
                SpeculativeDecoder(view, make_drafter("pld"), view.eos_token_ids).generate(
                    long_prompt, GenerationConfig(max_new_tokens=10))
                outcome["result"] = "finished"
            except GatherCancelled:
                outcome["result"] = "cancelled"
            finally:
                view.close()

        thread = threading.Thread(target=client)
        thread.start()
        deadline = time.monotonic() + 30
        while gather.stats.prefill_rows == 0 and time.monotonic() < deadline:
            time.sleep(0.0005)
        view.cancel()
        rows_at_cancel = gather.stats.prefill_rows
        thread.join(30)
        assert outcome["result"] == "cancelled"
        assert gather.stats.prefill_rows <= rows_at_cancel + N_BATCH < len(long_prompt)  # one chunk more at most
        assert gather.free_slots == 4
        # what was computed stays in the slot as a prefix, and the next request there is exact
        kept = slotted.cached_prefix(long_prompt, view.slot)
        assert 0 < kept < len(long_prompt)
        config = GenerationConfig(max_new_tokens=12)
        with gather.session(long_prompt, owner="a") as again:
            assert again.slot == view.slot
            result = SpeculativeDecoder(again, make_drafter("suffix"), again.eos_token_ids).generate(
                long_prompt, config)
        assert result.stats.cached_prompt_tokens == kept
        assert result.token_ids == plain(solo, long_prompt, config).token_ids


def test_a_slot_keeps_its_prefix_for_the_same_owner_only(solo, slotted):
    """A conversation's next turn lands in the slot that holds its history and runs only its new
    tokens; another owner's request never starts from it."""
    slotted.forget()  # earlier tests' prompts
    with Gather(slotted) as gather:
        rng = np.random.default_rng(8)
        prompt = rng.integers(3, solo.vocab_size, 50).tolist()
        config = GenerationConfig(max_new_tokens=16)
        with gather.session(prompt, owner="a") as first_view:
            first = SpeculativeDecoder(first_view, make_drafter("pld"), first_view.eos_token_ids).generate(
                prompt, config)
        busy = gather.session(owner="b")  # an empty slot, not the one holding "a"'s prompt
        assert busy.slot != first_view.slot
        turn = prompt + first.token_ids + rng.integers(3, solo.vocab_size, 8).tolist()
        with gather.session(turn, owner="a") as second_view:
            assert second_view.slot == first_view.slot
            second = SpeculativeDecoder(second_view, make_drafter("pld"), second_view.eos_token_ids).generate(
                turn, config)
        assert second.stats.cached_prompt_tokens == len(prompt) + len(first.token_ids) - 1
        assert second.token_ids == plain(solo, turn, config).token_ids
        busy.close()
        with gather.session(turn, owner="b") as stranger:
            result = SpeculativeDecoder(stranger, NoDrafter(), stranger.eos_token_ids).generate(turn, config)
        assert result.stats.cached_prompt_tokens == 0
        assert result.token_ids == second.token_ids


def test_a_short_request_behind_a_long_prefill_gets_its_first_token_first(solo, slotted):
    """The short prompt goes into the next decode whole, beside the long prompt's next chunk."""
    with Gather(slotted) as gather:
        rng = np.random.default_rng(9)
        long_prompt = rng.integers(3, solo.vocab_size, 500).tolist()
        short_prompt = rng.integers(3, solo.vocab_size, 10).tolist()
        first_token_at = {}
        long_started = threading.Event()

        def client(name, prompt):
            with gather.session(prompt) as view:
                stream = SpeculativeDecoder(view, NoDrafter(), view.eos_token_ids).stream(
                    prompt, GenerationConfig(max_new_tokens=4))
                if name == "long":
                    long_started.set()
                for _ in stream:
                    first_token_at.setdefault(name, time.monotonic())

        long_thread = threading.Thread(target=client, args=("long", long_prompt))
        long_thread.start()
        long_started.wait(10)
        while gather.stats.prefill_rows == 0:
            time.sleep(0.0005)
        short_thread = threading.Thread(target=client, args=("short", short_prompt))
        short_thread.start()
        short_thread.join(30)
        long_thread.join(30)
        assert first_token_at["short"] < first_token_at["long"]


def test_closing_the_gatherer_ends_waiting_requests(slotted):
    gather = Gather(slotted)
    view = gather.session()
    gather.close()
    seq = view.new_sequence(0)
    with pytest.raises(GatherCancelled):
        view.prefill(seq, [5, 6, 7])
    with pytest.raises(GatherCancelled):
        gather.session()


# ---------------------------------------------------------------------------- the default model
@pytest.mark.e2e
def test_four_clients_on_the_default_model_equal_their_solo_greedy_output():
    path = default_gguf()
    solo_runner = LlamaCppRunner(path, n_ctx=2048)
    runner = LlamaCppRunner(path, n_ctx=2048, slots=4)
    with Gather(runner) as gather:
        from aded.models import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m-instruct")

        def chat(text):
            return runner.tokenize(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                 add_generation_prompt=True, tokenize=False))

        code = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40))
        prompts = [chat("Repeat this list exactly, then add one more fruit: apple, banana, cherry, date."),
                   chat("Fix the bug and return the whole function:\ndef area(r):\n    return 3.14 * r * 2\n"),
                   chat("Rewrite this code with type hints, keeping every function:\n" + code),  # > n_batch
                   chat("Write a haiku about the sea.")]
        assert len(prompts[2]) > runner.n_batch
        configs = [GenerationConfig(max_new_tokens=n) for n in (48, 40, 64, 32)]
        expected = [plain(solo_runner, p, c).token_ids for p, c in zip(prompts, configs)]
        got = run_concurrently(gather, list(zip(prompts, configs, ("pld", "suffix", "pld", "suffix"))),
                               stagger_s=0.05)
        for i, result in enumerate(got):
            assert result.token_ids == expected[i], i
        assert gather.stats.parts > gather.stats.decodes
        runner.close()
        solo_runner.close()
