"""Service commands: api, worker, migrate, serve, create-key, keys."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add the service subcommands to the `gralora` parser."""
