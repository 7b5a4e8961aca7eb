"""Shared fixtures: a tiny offline Llama model and tokenizer; database and worker fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from gralora.tiny import build_tiny_model

# Database fixtures (real Postgres) and worker fixtures (real Redis + Celery) live in their own
# modules so that each stays small.
pytest_plugins = ["tests.fixtures_db", "tests.fixtures_worker"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 128, 2 layers) with a byte-level BPE tokenizer, built offline."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
