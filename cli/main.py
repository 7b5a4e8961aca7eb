"""Entry point of the `gralora` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser: engine commands, then service commands."""
    from cli import engine_commands, service_commands

    parser = argparse.ArgumentParser(
        prog="gralora", description="Train and serve GraLoRA adapters."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_commands.register(subparsers)
    service_commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the chosen command; returns the exit status."""
    from gralora.errors import GraloraError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except GraloraError as error:
        # One paragraph the user can act on; never a traceback for a bad input.
        print(f"error ({error.code}): {error.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
