"""The machine a benchmark ran on, named in every result: CPU model and count."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "processor": cpu_name()}
