#!/usr/bin/env bash
# The test suite: unit tests on tiny random models, then end-to-end tests on the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
