#!/usr/bin/env bash
# Optional: builds llama.cpp's own `llama-server` from the llama.cpp source that the installed
# llama-cpp-python was built from (its source distribution carries the tree in vendor/llama.cpp),
# with the same kernel flags as scripts/setup.sh, so that `aded bench` can run it side by side
# (methods `llama-server` and `llama-server-<spec type>`). About 10 minutes on 2 cores, once per
# machine: the binary is kept in $ADED_WHEEL_CACHE (default ~/.cache/aded-wheels) and linked as
# .venv/bin/llama-server.
#   bash scripts/build-llama-server.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/progress.sh
# the same version and kernel flags as scripts/setup.sh (read from it, so the two never part)
LLAMA_VERSION=$(sed -n 's/^LLAMA_VERSION=//p' scripts/setup.sh)
LLAMA_FLAGS=$(sed -n '/^LLAMA_FLAGS="/,/"$/p' scripts/setup.sh | sed 's/^LLAMA_FLAGS="//; s/"$//; s/\\$//' | tr '\n' ' ')
key=$(echo "$LLAMA_VERSION $LLAMA_FLAGS server" | sha256sum | cut -c1-12)
home="${ADED_WHEEL_CACHE:-$HOME/.cache/aded-wheels}/llama-server-$key"
if [ ! -x "$home/llama-server" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "Fetching the llama-cpp-python $LLAMA_VERSION source (it carries llama.cpp)"
  .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$LLAMA_VERSION"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  echo "Building llama-server: about 10 minutes on 2 cores, once per machine"
  # shellcheck disable=SC2086
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release $LLAMA_FLAGS \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >"$work/configure.log" 2>&1 \
    || { tail -30 "$work/configure.log"; echo "error: configuring llama.cpp failed" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j"$(nproc)" >"$work/build.log" 2>&1 &
  wait_for_build $! "$work/build.log" '\[ *[0-9]*%\]' llama-server \
    || { tail -40 "$work/build.log"; echo "error: building llama-server failed" >&2; exit 1; }
  mkdir -p "$home.partial"
  cp "$work/build/bin/llama-server" "$home.partial/"
  rm -rf "$home"
  mv "$home.partial" "$home"
fi
ln -sf "$home/llama-server" .venv/bin/llama-server
echo "llama-server: .venv/bin/llama-server ($("$home/llama-server" --version 2>&1 | head -1))"
