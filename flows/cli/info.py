"""``embedstream info``: what this machine runs, as the worker logs it at start."""

from __future__ import annotations

import argparse
import json

from flows.cli.shared import Commands


def add_commands(sub: Commands) -> None:
    info = sub.add_parser(
        "info", help="the CPU, the kernels and GEMM chosen for it, threads, devices, models and extras"
    )
    info.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    info.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from flows import info

    found = info.gather()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    cpu = found["cpu"]
    lines = [
        ("embedstream", found["version"]),
        ("cpu", cpu["processor"]),
        ("cpu features used", " ".join(cpu["features"]) or "none"),
        ("kernels", f"{cpu['kernels']} (best on this CPU: {cpu['best_kernels']}; EMBEDSTREAM_CPU_KERNELS)"),
        ("gemm", cpu["gemm"]),
        ("threads", f"{cpu['threads']} (RAYON_NUM_THREADS: {found['rayon_num_threads']})"),
        ("devices", ", ".join(found["devices"])),
        ("model cache", found["model_cache"]["path"]),
        ("default model", found["model_cache"]["default_model"]),
        ("whisper model", found["model_cache"]["whisper"]),
        ("extras", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in found["extras"].items())),
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    return 0
