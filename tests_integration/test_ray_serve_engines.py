"""Two Ray Serve replicas, each a full vLLM engine with aded's proposer, share what they learn."""

from __future__ import annotations

import pytest
from conftest import report, run_engine

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

TAUGHT = "Write a short poem about the sea, in four lines."
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def handle(default_model_dir):
    ray.init(num_cpus=2, include_dashboard=False, namespace="aded", log_to_driver=False)
    from serve_engines_app import EngineReplica

    yield serve.run(EngineReplica.bind(str(default_model_dir)), name="aded-engines")
    serve.shutdown()
    ray.shutdown()


def test_an_answer_learned_by_one_engine_replica_is_drafted_by_the_other(handle, default_model_dir):
    first = handle.generate.remote(TAUGHT, MAX_TOKENS).result()  # first sight, on replica A
    other = None
    for _ in range(20):  # the router picks replicas at random: ask until the other one answers
        answer = handle.generate.remote(TAUGHT, MAX_TOKENS).result()
        if answer["replica"] != first["replica"]:
            other = answer
            break
    assert other is not None, "the second replica never answered"
    plain = run_engine(model=default_model_dir, prompts=[TAUGHT], max_tokens=MAX_TOKENS, k=4, method=None)
    assert first["token_ids"] == plain["token_ids"][0] and other["token_ids"] == plain["token_ids"][0]
    # replica B never served this prompt: what it drafts beyond first-sight acceptance it learned from A
    assert other["accepted_per_draft"] > first["accepted_per_draft"] + 0.5, (first, other)
    report("ray-serve-engines-shared-state", {
        "first_sight_accepted_per_draft": round(first["accepted_per_draft"], 3),
        "other_replica_accepted_per_draft": round(other["accepted_per_draft"], 3),
        "first_sight_tokens_per_s": round(first["tokens_per_s"], 2),
        "other_replica_tokens_per_s": round(other["tokens_per_s"], 2),
    })  # fmt: skip
