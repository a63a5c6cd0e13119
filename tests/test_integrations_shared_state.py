"""The shared learned state without Ray: merging deltas, versions, bounds, failures, save and restore."""

from __future__ import annotations

import numpy as np
import pytest

from aded.integrations.shared_state import (
    Bounds,
    CountTable,
    InlineTransport,
    SharedStateClient,
    SharedStateCore,
)


def table(*sequences, bounds: Bounds | None = None) -> CountTable:
    counts = CountTable(bounds or Bounds())
    for sequence in sequences:
        counts.add_sequence(sequence)
    return counts


def test_counts_merge_by_addition_and_round_trip_through_arrays():
    first, second = table([1, 2, 3, 4]), table([1, 2, 3, 9])
    first.merge(second)
    assert first.tri[(1, 2)] == {3: 2.0} and first.tri[(2, 3)] == {4: 1.0, 9: 1.0}
    assert first.bi[3] == {4: 1.0, 9: 1.0}
    again = CountTable.from_arrays(first.to_arrays())
    assert again.tri == first.tri and again.bi == first.bi


def test_bounds_keep_the_strongest_contexts_and_successors():
    bounds = Bounds(max_contexts=2, max_successors=1)
    counts = table(*([[1, 2, 3]] * 5 + [[4, 5, 6]] * 3 + [[7, 8, 9]] + [[1, 2, 7]] * 2), bounds=bounds)
    counts.compact()
    assert counts.tri == {(1, 2): {3: 5.0}, (4, 5): {6: 3.0}}
    with pytest.raises(ValueError):
        Bounds(max_contexts=0)


def test_store_versions_and_answers_only_what_is_new():
    core = SharedStateCore()
    version, snapshot = core.exchange(table([1, 2, 3]).to_arrays(), 0)
    assert version == 1 and snapshot is not None
    assert core.exchange(None, 1) == (1, None)  # nothing new for a current replica
    version, snapshot = core.exchange(None, 0)
    assert version == 1 and CountTable.from_arrays(snapshot).tri == {(1, 2): {3: 1.0}}


def test_clients_share_through_the_store_and_swap_views_whole():
    core = SharedStateCore()
    a, b = (SharedStateClient(InlineTransport(core), interval_s=0.0) for _ in range(2))
    a.record([10, 11, 12, 13])
    assert a.view.tri[(10, 11)] == {12: 1.0}  # local at once
    old_view = b.view
    assert a.poll() and b.poll()
    assert b.view is not old_view and b.view.tri[(11, 12)] == {13: 1.0}
    assert old_view.tri == {}  # the old view was never mutated in place


def test_an_unreachable_store_keeps_local_learning_and_delivers_later():
    core = SharedStateCore()
    now = [0.0]
    transport = InlineTransport(core)
    client = SharedStateClient(transport, interval_s=1.0, clock=lambda: now[0])
    transport.reachable = False
    client.record([1, 2, 3, 4])
    assert client.poll() is False and client.failures == 1
    assert client.view.tri[(1, 2)] == {3: 1.0} and core.version == 0
    transport.reachable = True
    now[0] = 1.5  # still backing off (2 s after one failure)
    client.poll()
    assert core.version == 0
    now[0] = 10.0
    client.poll()
    assert core.version == 1 and client.failures == 0
    assert CountTable.from_arrays(core.snapshot()).tri[(2, 3)] == {4: 1.0}


def test_a_client_without_a_store_learns_locally():
    client = SharedStateClient(None)
    client.record([5, 6, 7])
    assert client.poll() is False and client.view.tri == {(5, 6): {7: 1.0}}


def test_decay_fades_old_counts_and_drops_the_smallest():
    core = SharedStateCore(decay=0.5)
    core.exchange(table([1, 2, 3]).to_arrays(), 0)
    core.exchange(table([4, 5, 6]).to_arrays(), 1)
    assert core.table.followers((1, 2)) == {3: 0.5} and core.table.followers((4, 5)) == {6: 1.0}
    with pytest.raises(ValueError):
        SharedStateCore(decay=0.0)


def test_save_and_restore(tmp_path):
    path = tmp_path / "shared.aded"
    core = SharedStateCore(path=str(path))
    core.exchange(table([1, 2, 3, 4]).to_arrays(), 0)
    core.save()
    restored = SharedStateCore(path=str(path))
    assert restored.table.to_arrays()["learned_tri_counts"].tolist() == core.table.to_arrays()["learned_tri_counts"].tolist()
    assert restored.version > core.version
    np.testing.assert_array_equal(restored.snapshot()["learned_tri_keys"], core.snapshot()["learned_tri_keys"])
    (tmp_path / "other").write_bytes(b"not a datastore")
    with pytest.raises(Exception, match="not a readable state file"):
        SharedStateCore(path=str(tmp_path / "other"))
