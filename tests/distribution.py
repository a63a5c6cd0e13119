"""Statistical checks for sampling tests: do sampled outputs follow an exact distribution?"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping

import numpy as np
from scipy import stats


def assert_follows(samples: Iterable[Hashable], expected: Mapping[Hashable, float]) -> None:
    """Every sample has positive probability, and a chi-square test (cells expecting fewer than 5
    samples pooled into one) does not reject `expected` at p = 1e-3."""
    counts = Counter(samples)
    impossible = [s for s in counts if expected.get(s, 0) <= 0]
    assert not impossible, f"outputs with probability 0 were sampled: {impossible[:5]}"
    runs = sum(counts.values())
    cells = sorted(expected)
    observed = np.array([counts[c] for c in cells], dtype=float)
    wanted = np.array([expected[c] for c in cells]) * runs
    big = wanted >= 5
    observed = np.append(observed[big], observed[~big].sum())
    wanted = np.append(wanted[big], wanted[~big].sum())
    keep = wanted > 0
    result = stats.chisquare(observed[keep], wanted[keep] * observed[keep].sum() / wanted[keep].sum())
    assert result.pvalue > 1e-3, (observed, wanted)
