"""Offline replay agrees with real greedy runs: same steps, same accepted lengths, same MAT, when the
drafter is deterministic and the replay sees what the engine did (token limit, no budget: the real
budget also corrects t(k) by observed step times, which no replay can know)."""

from __future__ import annotations

import json

import pytest
from conftest import hf_greedy, tiny_llama
from test_bench_smoke import QUESTIONS, tiny_char_tokenizer

from aded.backends.hf import HFRunner
from aded.bench.questions import Question
from aded.bench.runner import BenchConfig, run_bench
from aded.budget import CostModel, VerifyAll, read_cost_file
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters import make_drafter
from aded.drafters.base import Drafter
from aded.replay import Recorded, recorded_from_results, render_simulation, replay, replay_one, simulate_results
from aded.tree import DraftTree

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 12], [5, 6, 7, 30, 31, 5, 6, 7]]


@pytest.mark.parametrize("name", ["pld", "suffix"])
def test_replay_equals_real_run(tiny_model, name):
    max_new = 24
    drafter = make_drafter(name)
    decoder = SpeculativeDecoder(HFRunner(tiny_model), drafter, (), VerifyAll())
    real, records = [], []
    for prompt in PROMPTS:  # one drafter and one budget across requests, as in a server
        result = decoder.generate(prompt, GenerationConfig(max_new_tokens=max_new))
        assert result.token_ids == hf_greedy(tiny_model, prompt, max_new)
        real.append(result.stats)
        records.append(Recorded(prompt, result.token_ids, max_new_tokens=max_new))
    stats = replay(make_drafter(name), records, 24, None)["all"]
    assert stats.accepted_lengths == [n for s in real for n in s.accepted_lengths]
    assert stats.steps == sum(s.steps for s in real)
    assert stats.draft_nodes == sum(s.draft_nodes for s in real)
    real_mat = sum(s.generated_tokens - 1 for s in real) / sum(s.steps for s in real)
    assert stats.mean_accepted_tokens == pytest.approx(real_mat)
    budgeted = replay(make_drafter(name), records, 24, CostModel.typical_cpu())["all"]
    assert budgeted.verify_cost_s > 0 and budgeted.predicted_speedup(CostModel.typical_cpu()(0)) > 0


def test_simulate_recorded_bench_matches_bench_mat():
    model = tiny_llama(vocab_size=160, seed=5, logit_scale=4.0)
    questions = [Question(str(q["id"]), q["category"], tuple(q["turns"])) for q in QUESTIONS]
    results = run_bench(model, tiny_char_tokenizer(), questions, ["pld", "suffix"],
                        BenchConfig(max_new_tokens=20, budget="off", warmup=False))
    records = recorded_from_results(results)
    assert len(records) == sum(len(q.turns) for q in questions)
    measured = {(s["method"], s["category"]): s for s in results["summary"]}
    for entry in simulate_results(results, ["pld", "suffix"]):
        real = measured[(entry["drafter"], entry["category"])]
        assert real["identical"] == 1.0
        assert entry["mean_accepted_tokens"] == pytest.approx(real["mean_accepted_tokens"], abs=1e-3), entry
    typical = simulate_results(results, ["pld", "oracle"], budget="typical")
    assert typical[0]["predicted_speedup"] is not None
    oracle = [row for row in typical if row["drafter"] == "oracle" and row["category"] == "all"][0]
    assert oracle["mean_accepted_tokens"] >= typical[0]["mean_accepted_tokens"]  # the ceiling
    assert oracle["accepted_per_node"] == pytest.approx(1.0)  # it drafts nothing the model rejects
    results["machine"]["max_tree_leaves"] = 1  # recorded on a chain-only runner (llama.cpp)
    chains, trees = (simulate_results(results, ["pld"], budget="off", max_leaves=width)[0]
                     for width in (-1, None))
    assert chains["nodes_per_step"] < trees["nodes_per_step"]  # one path each step, or any tree
    assert chains["mean_accepted_tokens"] <= trees["mean_accepted_tokens"]


def test_simulate_repeats_report_means_and_ranges():
    model = tiny_llama(vocab_size=160, seed=5, logit_scale=4.0)
    questions = [Question(str(q["id"]), q["category"], tuple(q["turns"])) for q in QUESTIONS]
    results = run_bench(model, tiny_char_tokenizer(), questions, ["pld"],
                        BenchConfig(max_new_tokens=20, budget="off", warmup=False))
    once = simulate_results(results, ["pld"], budget="off")
    thrice = simulate_results(results, ["pld"], budget="off", repeats=3)
    assert [(r["drafter"], r["category"]) for r in thrice] == [(r["drafter"], r["category"]) for r in once]
    for single, repeated in zip(once, thrice):  # without a budget, pld replays the same each time
        mat = single["mean_accepted_tokens"]
        assert repeated["repeats"] == 3
        assert repeated["mean_accepted_tokens"] == pytest.approx(mat)
        assert repeated["mean_accepted_tokens_range"] == [mat, mat]
    budgeted = simulate_results(results, ["pld"], budget="typical", repeats=2)[0]
    low, high = budgeted["predicted_speedup_range"]
    assert low <= budgeted["predicted_speedup"] <= high
    assert f"({low:.2f}-{high:.2f})" in render_simulation([budgeted])
    with pytest.raises(ValueError, match="repeats"):
        simulate_results(results, ["pld"], repeats=0)


def test_a_cost_file_of_either_backend_or_a_results_file_prices_the_replay(tmp_path):
    curve = {"sizes": [0, 1, 8], "seconds": [0.01, 0.014, 0.03]}
    (tmp_path / "cache.json").write_text(json.dumps({**curve, "model": "m"}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"config": {"cost_model": curve}}))
    for source in (tmp_path / "cache.json", tmp_path / "run"):
        costs = read_cost_file(source)
        assert costs(0) == pytest.approx(0.01) and costs(8) == pytest.approx(0.03)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no cost curve"):
        read_cost_file(tmp_path / "bad.json")


def test_replay_runs_the_engines_loop_and_learns_no_false_evidence():
    """The recorded runner answers only where the recording is known: a drafter asking for the
    model's top tokens gets the recorded one and -1 (no evidence) elsewhere, never invented ids."""
    seen = []

    class Spy(Drafter):
        wants_topk = 3

        def propose(self, context_ids, max_nodes):
            return DraftTree.chain([2, 5, 3][:max_nodes])

        def observe(self, feedback):
            seen.append(feedback.model_topk)

    stats = replay_one(Spy(), Recorded([9, 9], [1, 2, 5, 6, 7]), 8)  # the prefill says 1
    assert stats.accepted_lengths == [3, 1]  # 2, 5 accepted, 3 rejected (6 came); then 7 alone
    first = seen[0]
    assert first[0].tolist() == [2, -1, -1] and first[1].tolist() == [5, -1, -1]  # after root, after 2
    assert first[2].tolist() == [6, -1, -1]
    assert (first[3:] == -1).all()  # after a node that left the recording: nothing


def test_simulate_needs_recorded_ids_and_known_drafters():
    with pytest.raises(ValueError, match="no recorded token ids"):
        recorded_from_results({"questions": [{"method": "hf", "id": "1", "category": "c"}]})
    with pytest.raises(ValueError, match="no hf rows"):
        recorded_from_results({"questions": []})
    results = {"config": {}, "questions": [{"method": "hf", "id": "1", "category": "c",
                                            "prompt_token_ids": [[1, 2]], "output_token_ids": [[3, 4]]}]}
    with pytest.raises(ValueError, match="unknown drafter"):
        simulate_results(results, ["nope"])
    with pytest.raises(ValueError, match="does not exist"):
        simulate_results(results, ["pld"], budget="sometimes")


def test_recorded_topk_ranks_the_models_tokens_along_the_output_and_replay_hands_them_on(tiny_model):
    """`--model-topk`: the model's own ranking on the recorded path, computed in a few chained
    forwards, equals a plain forward over prompt + output; a drafter asking for top-k then gets
    the runners-up on the path (and still nothing off it)."""
    import torch

    from aded.replay import recorded_topk

    prompt = PROMPTS[0]
    output = hf_greedy(tiny_model, prompt, 20)
    record = Recorded(prompt, output)
    table = recorded_topk(HFRunner(tiny_model), record, 4, chunk=6)  # chains shorter than the output
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]
    assert table.shape == (len(output), 4)
    assert table[:, 0].tolist() == output
    assert table.tolist() == logits.topk(4).indices.tolist()  # greedy: the output is the top-1

    seen = []

    class Spy(Drafter):
        wants_topk = 4

        def propose(self, context_ids, max_nodes):
            return DraftTree.empty()

        def observe(self, feedback):
            seen.append(feedback.model_topk[0].tolist())

    replay_one(Spy(), Recorded(prompt, output, model_topk=table), 8)
    assert seen == table[1:].tolist()  # every step's root row: the model's ranking there
    with pytest.raises(ValueError, match="led by that token"):
        replay_one(Spy(), Recorded(prompt, output, model_topk=table[:, ::-1]), 8)
