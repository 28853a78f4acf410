"""Makes a CUDA build of the native core importable without LD_LIBRARY_PATH.

A wheel built with ``deploy/cuda/build-wheel.sh`` links the CUDA 13 runtime, cuBLAS,
cuRAND and NVRTC dynamically and bundles none of them. On a GPU host they usually
come from NVIDIA's pip wheels (``nvidia-cublas`` and friends, which PyTorch installs
too) under ``site-packages/nvidia/``, a directory the loader does not search. When the
first import fails for that reason, load them from there once and retry. The CPU
build needs none of this: its import succeeds at once.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
from pathlib import Path
from types import ModuleType

# In dependency order: cuBLAS needs cuBLASLt, everything needs the runtime.
_LIBRARIES = ("libcudart.so.13", "libnvrtc.so.13", "libcurand.so.10", "libcublasLt.so.13", "libcublas.so.13")


def _library_dirs() -> list[Path]:
    dirs: list[Path] = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            dirs += [root / "cu13" / "lib", *sorted(root.glob("*/lib"))]
    return [d for d in dirs if d.is_dir()]


def import_native() -> ModuleType:
    try:
        return importlib.import_module("operators._native")
    except ImportError as error:
        if "libcuda.so" in str(error):
            raise ImportError(
                "this embedstream build uses CUDA and needs the NVIDIA driver (libcuda.so.1), "
                "which this machine lacks: install the CPU build here"
            ) from error
        if not any(name.split(".so")[0] in str(error) for name in _LIBRARIES):
            raise
        missing = error
    dirs = _library_dirs()
    for name in _LIBRARIES:
        found = next((d / name for d in dirs if (d / name).exists()), None)
        if found is not None:
            ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
    try:
        return importlib.import_module("operators._native")
    except ImportError as error:
        raise ImportError(
            f"this embedstream build uses CUDA 13 and cannot load its libraries ({error}): "
            "pip install nvidia-cuda-runtime nvidia-cuda-nvrtc nvidia-curand nvidia-cublas, "
            "or put the CUDA 13 libraries on LD_LIBRARY_PATH"
        ) from missing


import_native()
