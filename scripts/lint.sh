#!/usr/bin/env bash
# Static checks: ruff (lint rules in pyproject.toml), mypy (its `files` there: src/aded), and the
# import graph (no circles between aded's modules). `pip install -e ".[lint]"` installs the tools;
# bash scripts/setup.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests scripts
.venv/bin/mypy
.venv/bin/python scripts/import-graph.py
