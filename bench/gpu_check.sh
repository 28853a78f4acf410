#!/usr/bin/env bash
# The GPU check, in one command, on a machine with an NVIDIA GPU, Python 3.12, PyTorch,
# transformers and sentence-transformers, and no network or Rust:
#
#   bench/gpu_check.sh [WHEEL]      (default: the CUDA wheel in dist/)
#
# Installs the prebuilt CUDA wheel (deploy/cuda/build-wheel.sh) into a scratch
# directory, then runs bench/gpu_check.py: agreement with sentence-transformers on a
# seeded random MiniLM-shaped model, and tokens/s of both on the same GPU. Prints one
# JSON object; exits non-zero when the vectors disagree. Takes about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

wheel="${1:-$(ls -t dist/embedstream-*.whl 2>/dev/null | head -n1)}"
[ -f "$wheel" ] || { echo "no wheel: build one with deploy/cuda/build-wheel.sh" >&2; exit 2; }
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
python3 bench/gpu_check.py "${@:2}"
