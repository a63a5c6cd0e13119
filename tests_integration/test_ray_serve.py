"""Two Ray Serve CPU replicas share learned state: a pattern taught through one is drafted by the other."""

from __future__ import annotations

import pytest
from conftest import report

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

PATTERN = [7001, 7002, 7003, 7004, 7005, 7006, 7007, 7008]


@pytest.fixture(scope="module")
def handle():
    ray.init(num_cpus=2, include_dashboard=False, namespace="aded", log_to_driver=False)
    from serve_app import app

    yield serve.run(app, name="aded-replicas")
    serve.shutdown()
    ray.shutdown()


def test_a_pattern_learned_through_one_replica_is_drafted_by_the_other(handle):
    taught = handle.teach.remote([11, 12, 13], PATTERN * 3).result()
    assert taught["delivered"], taught
    other = None
    for _ in range(60):  # the router picks replicas at random: ask until the other one answers
        answer = handle.draft.remote([21, 22, 23, 7001, 7002]).result()
        if answer["replica"] != taught["replica"]:
            other = answer
            break
    assert other is not None, "the second replica never answered"
    assert other["draft"][:3] == [7003, 7004, 7005], other
    report("ray-serve-shared-state", {"taught_by": taught["replica"], "drafted_by": other["replica"],
                                      "draft": other["draft"], "snapshot_version": other["version"]})  # fmt: skip
