#!/usr/bin/env bash
# Builds a CUDA-enabled embedstream wheel (abi3, CPython >= 3.9) on any x86-64 Linux
# machine, with or without a GPU, from PyPI packages alone: NVIDIA publishes nvcc,
# the headers and the CUDA libraries as wheels.
#
#   deploy/cuda/build-wheel.sh [OUT_DIR]        (default: dist/)
#
# CUDA 13.0 on purpose: the GPU hosts run driver 580 (CUDA 13.0), which rejects PTX
# from a newer nvcc, and their PyTorch ships CUDA 13 libraries. Kernels are built for
# compute capability 90 (H100/H200) unless CUDA_COMPUTE_CAP says otherwise.
#
# The wheel links libcuda.so.1, libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10
# and libnvrtc.so.13 dynamically and bundles none of them: on the GPU host they come
# from the driver and from the nvidia-* wheels (PyTorch's, or `pip install
# nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-cuda-runtime`), which
# `operators` preloads. The CPU build is unaffected: the `cuda` feature is off by default.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT_DIR="${1:-dist}"
CUDA_ROOT="${EMBEDSTREAM_CUDA_ROOT:-$HOME/.cache/embedstream/cuda-13.0.2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/embedstream/target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"

# The CUDA 13.0.2 toolkit, as PyPI wheels (pinned; all of one release).
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)

if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
    echo "==> CUDA 13.0 toolkit from PyPI into $CUDA_ROOT"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        -d "$tmp/wheels" "${PACKAGES[@]}"
    for wheel in "$tmp"/wheels/*.whl; do
        "$PY" -m zipfile -e "$wheel" "$tmp/unpacked"
    done
    rm -rf "$CUDA_ROOT.partial"
    mv "$tmp/unpacked/nvidia/cu13" "$CUDA_ROOT.partial"
    root="$CUDA_ROOT.partial"
    chmod +x "$root"/bin/* "$root"/bin/crt/* "$root"/nvvm/bin/* 2>/dev/null || true
    # Linkers look for unversioned names; the wheels ship only the versioned ones.
    for lib in cudart cublas cublasLt curand nvrtc; do
        ln -sf "$(cd "$root/lib" && ls "lib$lib.so."* | head -n1)" "$root/lib/lib$lib.so"
    done
    ln -sfn lib "$root/lib64"
    # libcuda belongs to the driver, not the toolkit. Link against a stub that
    # defines every driver entry point of cuda.h under the driver's soname; the
    # real library is found at run time.
    mkdir -p "$root/lib/stubs"
    echo '#include <cuda.h>' | gcc -E -I "$root/include" - \
        | grep -oE 'CUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' \
        | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
        | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$tmp/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$tmp/libcuda_stub.c"
    mv "$root" "$CUDA_ROOT"
fi

export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvcc --version | tail -n2

echo "==> building the wheel (features: python, cuda; compute capability $CUDA_COMPUTE_CAP)"
if ! "$PY" -m maturin --version >/dev/null 2>&1; then
    "$PY" -m pip install -q "maturin==1.16.0"
fi
# --auditwheel skip: the CUDA libraries must come from the host, never from the wheel.
"$PY" -m maturin build --release --features python,cuda --auditwheel skip \
    --compatibility manylinux_2_28 --out "$OUT_DIR"
ls -l "$OUT_DIR"/*.whl
