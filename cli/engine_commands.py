"""Engine commands: train, validate-data, check, make-tiny-model."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the engine subcommands to the `gralora` parser."""
    tiny = subparsers.add_parser("make-tiny-model", help="write a tiny random Llama for demos/tests")
    tiny.add_argument("output_dir")
    tiny.set_defaults(handler=_make_tiny_model)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from gralora.tiny import build_tiny_model

    path = build_tiny_model(args.output_dir)
    print(f"tiny model written to {path}")
    return 0
