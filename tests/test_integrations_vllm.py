"""The vLLM proposer without vLLM: a fake config and a fake engine loop that calls it like vLLM does."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from trees import tree_of

from aded.integrations.shared_state import (
    InlineTransport,
    SharedStateClient,
    SharedStateCore,
)
from aded.integrations.vllm import AdedProposer, best_path
from aded.tree import DraftTree


def config(k: int = 4, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k), parallel_config=SimpleNamespace(rank=rank))


class FakeEngine:
    """vLLM's loop in miniature: rows of a token buffer, greedy 'model' = a fixed continuation per request."""

    def __init__(self, proposer: AdedProposer, max_rows: int = 4, max_len: int = 256) -> None:
        self.proposer = proposer
        self.tokens = np.zeros((max_rows, max_len), dtype=np.int64)  # [max_rows, max_model_len]
        self.lengths = np.zeros(max_rows, dtype=np.int64)
        self.targets: list[list[int]] = []  # the full text each row's request will produce
        self.sampled: list[list[int]] = []
        self.drafted = self.accepted = 0

    def load(self, rows: list[tuple[list[int], list[int]]]) -> None:
        """(prompt, greedy continuation) per row; the first token is 'sampled' by the prefill."""
        self.targets, self.sampled = [], []
        for i, (prompt, output) in enumerate(rows):
            text = prompt + output
            self.tokens[i, : len(prompt) + 1] = text[: len(prompt) + 1]
            self.lengths[i] = len(prompt) + 1
            self.targets.append(text)
            self.sampled.append([text[len(prompt)]])

    def step(self) -> list[list[int]]:
        drafts = self.proposer.propose(self.sampled, self.lengths.copy(), self.tokens)
        assert len(drafts) == len(self.sampled)
        for i, draft in enumerate(drafts):
            assert len(draft) <= self.proposer.k
            n, text = int(self.lengths[i]), self.targets[i]
            if n >= len(text):
                self.sampled[i] = []
                continue
            accepted = 0
            while accepted < len(draft) and n + accepted < len(text) - 1 and draft[accepted] == text[n + accepted]:
                accepted += 1
            commit = text[n : n + accepted + 1]
            self.drafted += bool(draft)
            self.accepted += accepted
            self.tokens[i, n : n + len(commit)] = commit
            self.lengths[i] += len(commit)
            self.sampled[i] = commit
        return drafts

    def run(self) -> list[list[int]]:
        while any(self.sampled):
            self.step()
        return [self.tokens[i, : self.lengths[i]].tolist() for i in range(len(self.targets))]


def repetitive(start: int, n: int = 60) -> list[int]:
    return [start + (i % 7) for i in range(n)]


# ---------------------------------------------------------------- best path
def test_best_path_takes_highest_expected_accepted_length_cut_to_k():
    # a(0.9) -> b(0.8) -> c(0.1); x(0.95) -> y(0.2): sums 1.7 (a b) vs 1.15 (x y); cut to 2
    tree = DraftTree(np.array([1, 2, 3, 9, 8]), np.array([-1, 0, 1, -1, 3]), scores=np.array([0.9, 0.8, 0.1, 0.95, 0.2]))
    assert best_path(tree, 2) == [1, 2]
    assert best_path(tree, 3) == [1, 2, 3]
    assert best_path(tree, 1) == [9]
    assert best_path(DraftTree.empty(), 3) == []


def test_best_path_without_scores_follows_first_children():
    tree = tree_of([[1, 2, 3], [4, 5, 6, 7]])
    tree = DraftTree(tree.token_ids, tree.parents)  # drop the builder's scores
    assert best_path(tree, 5) == [1, 2, 3]
    assert best_path(tree, 2) == [1, 2]


# ---------------------------------------------------------------- the proposer in a loop
def test_greedy_loop_drafts_and_accepts_with_default_drafter():
    proposer = AdedProposer(config(k=4))
    engine = FakeEngine(proposer)
    engine.load([([1, 2, 3], repetitive(10)), ([5, 6], repetitive(40))])
    outputs = engine.run()
    assert outputs == engine.targets  # the fake verifier is exact; the proposer never broke the loop
    assert engine.accepted > 0 and proposer.stats.num_accepted_tokens == engine.accepted
    assert proposer.stats.accepted_per_draft > 1.0


@pytest.mark.parametrize("name", ["pld", "suffix", "aded", "hybrid"])
def test_every_drafter_runs_and_is_deterministic(name):
    runs = []
    for _ in range(2):
        proposer = AdedProposer(config(k=3), drafter=name)
        engine = FakeEngine(proposer)
        engine.load([([1, 2, 3], repetitive(10, 40)), ([4], repetitive(20, 30))])
        drafts = []
        while any(engine.sampled):
            drafts.append(engine.step())
        runs.append(drafts)
        assert engine.accepted > 0, name
    assert runs[0] == runs[1]


def test_rows_without_a_decode_get_no_draft_and_keep_their_state():
    proposer = AdedProposer(config())
    context = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 0, 0], [7, 8, 9, 0, 0, 0, 0, 0, 0, 0]])
    drafts = proposer.propose([[2], []], np.array([8, 3]), context)
    assert drafts[0][:3] == [3, 1, 2] and drafts[1] == []
    assert 1 not in proposer.rows


def test_a_replaced_row_starts_a_new_request_without_the_old_context():
    proposer = AdedProposer(config(k=4), drafter="suffix")
    engine = FakeEngine(proposer)
    engine.load([(list(range(100, 110)), list(range(100, 110)) * 3)])
    engine.run()
    engine.load([([200, 201, 202], [203, 204] * 10)])
    engine.step()
    row = proposer.rows[0]
    assert row.context[0] == 200 and proposer.stats.num_requests == 2
    assert not set(row.drafter._request.sequences()[0].tolist()) & set(range(100, 110))


def test_a_moved_row_keeps_its_request():
    proposer = AdedProposer(config())
    engine = FakeEngine(proposer)
    engine.load([([1, 2], repetitive(10, 12)), ([3, 4], repetitive(30, 40))])
    engine.step()
    engine.step()
    # vLLM condenses its batch: row 0 finished, row 1 moves to row 0
    engine.tokens[0] = engine.tokens[1]
    engine.lengths[0], engine.targets, engine.sampled = engine.lengths[1], [engine.targets[1]], [engine.sampled[1]]
    engine.step()
    assert proposer.stats.num_requests == 2 and set(proposer.rows) == {0}


def test_rows_beyond_the_batch_are_ended():
    proposer = AdedProposer(config())
    engine = FakeEngine(proposer)
    engine.load([([1], repetitive(10, 10)), ([2], repetitive(20, 10))])
    engine.step()
    engine.targets, engine.sampled = engine.targets[:1], engine.sampled[:1]
    engine.step()
    assert set(proposer.rows) == {0} and len(proposer._spare) == 1


def test_bad_sizes_and_names_fail_at_construction():
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        AdedProposer(config(k=0))
    with pytest.raises(ValueError, match="unknown drafter"):
        AdedProposer(config(), drafter="nope")


# ---------------------------------------------------------------- learning across requests and replicas
def test_a_pattern_learned_through_one_replica_is_drafted_by_the_other():
    core = SharedStateCore()
    replicas = [AdedProposer(config(k=4), drafter="aded", shared=SharedStateClient(InlineTransport(core), interval_s=0.0)) for _ in range(2)]
    pattern = [500, 501, 502, 503, 504, 505, 506, 507]
    engine = FakeEngine(replicas[0])
    engine.load([([1, 2, 3], pattern * 3)])
    engine.run()
    replicas[0].finish_all()
    replicas[0].shared.poll()  # sends the finished request's counts
    assert core.version >= 1
    # replica 1 never saw the pattern; its prompt ends with the pattern's first two tokens
    drafts = replicas[1].propose([[501]], np.array([5]), np.array([[7, 8, 9, 500, 501]]))
    assert drafts[0][:3] == [502, 503, 504]
    lonely = AdedProposer(config(k=4), drafter="aded")
    assert lonely.propose([[501]], np.array([5]), np.array([[7, 8, 9, 500, 501]]))[0][:3] != [502, 503, 504]


def test_tensor_parallel_ranks_other_than_zero_send_nothing():
    core = SharedStateCore()
    proposer = AdedProposer(config(rank=1), drafter="aded", shared=SharedStateClient(InlineTransport(core), interval_s=0.0))
    engine = FakeEngine(proposer)
    engine.load([([1, 2, 3], repetitive(50, 20))])
    engine.run()
    proposer.finish_all()
    proposer.shared.poll()
    assert core.version == 0


def test_the_modules_import_neither_vllm_nor_ray():
    code = "import sys, aded.integrations.vllm, aded.integrations.shared_state, aded.integrations.sglang; print(sorted(m for m in ('vllm', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rows_of_one_proposer_share_what_their_drafter_learns():
    proposer = AdedProposer(config(k=4), drafter="aded")
    pattern = [500, 501, 502, 503, 504, 505, 506, 507]
    engine = FakeEngine(proposer)
    engine.load([([1, 2, 3], pattern * 3)])
    engine.run()
    proposer.finish_all()  # the row's request ends: its sibling folds it into the shared counts
    drafts = proposer.propose([[501]], np.array([5]), np.array([[7, 8, 9, 500, 501]]))
    assert drafts[0][:3] == [502, 503, 504]
