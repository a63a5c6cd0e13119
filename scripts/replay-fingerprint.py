#!/usr/bin/env python3
"""Mean accepted tokens of every drafter under the cost-aware budget, on recorded benchmark runs,
with a fake clock: a fingerprint of what the loop, the budget and the drafters decide.

A real replay charges measured drafting time, so its budget (which thins drafting that does not
pay) varies a little from run to run. Here every `time.perf_counter()` call advances the clock by
50 microseconds, so two source trees that decide alike print identical lines, and a refactoring
that should change nothing is checked in a minute:

    PYTHONPATH=/path/to/old/src .venv/bin/python scripts/replay-fingerprint.py > old.txt
    .venv/bin/python scripts/replay-fingerprint.py > new.txt && diff old.txt new.txt
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

RUNS = ["llama-smollm2-shipped", "hf-smollm2-shipped", "llama-smollm2-sessions", "llama-qwen1.5b-sessions"]
DRAFTERS = ["pld", "suffix", "edit", "hybrid", "aded", "oracle"]


def main() -> int:
    ticks = itertools.count()
    time.perf_counter = lambda: next(ticks) * 5e-5  # before aded reads the clock anywhere
    from aded.replay import simulate_results

    results_dir = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for run in RUNS:
        results = json.loads((results_dir / run / "results.json").read_text())
        for row in simulate_results(results, DRAFTERS):
            if row["category"] == "all":
                keys = ("drafter", "mean_accepted_tokens", "nodes_per_step", "steps", "tokens")
                print(run, json.dumps({k: row[k] for k in keys}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
