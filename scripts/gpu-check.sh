#!/usr/bin/env bash
# The prepared GPU check (src/aded/gpu_check.py), for the device machine: identity of every drafter
# with transformers' generate on CUDA, t(k) of trees up to 64 nodes on 0.5B/1.5B/7B shapes, and the
# recorded outputs replayed under the measured t(k). Runs from the working tree (no install: the
# device image has torch, transformers and numpy), writes gpu-check.json, report.md and log.txt to
# $OUT (or ./gpu-check). From a session that is lent a GPU:
#   run(command="bash scripts/gpu-check.sh", timeout_s=540)
# and here, as a rehearsal on tiny shapes:  bash scripts/gpu-check.sh --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
# this machine's environment where there is one (the rehearsal); the device image's python3 there
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/log.txt" || true
PYTHONPATH=src PYTHONUNBUFFERED=1 "$PYTHON" -m aded.gpu_check --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
