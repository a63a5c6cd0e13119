"""Token facts beside the runners, not in the `aded.api` facade or the benchmark, so that runners,
the benchmark and the server can ask without importing a layer above them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["common_prefix", "eos_token_ids"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two sequences share (what a prompt cache can keep of the next prompt)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def eos_token_ids(runner, tokenizer) -> list[int]:
    """Where generation ends: the runner's own stop tokens and the tokenizer's EOS."""
    ids = {int(t) for t in runner.eos_token_ids}
    if tokenizer is not None and isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
