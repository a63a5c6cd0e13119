"""Token facts that need a runner and its tokenizer together. They live beside the runners, not in
the `aded.api` facade, so the benchmark and the server can ask without importing the layer above.
"""

from __future__ import annotations

__all__ = ["eos_token_ids"]


def eos_token_ids(runner, tokenizer) -> list[int]:
    """Where generation ends: the runner's own stop tokens and the tokenizer's EOS."""
    ids = {int(t) for t in runner.eos_token_ids}
    if tokenizer is not None and isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
