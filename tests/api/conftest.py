"""API tests send their jobs to a queue of their own, so a session's worker never trains them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.fixtures_db import reset_service_caches


@pytest.fixture(scope="module", autouse=True)
def api_only_queue(service_env: dict[str, str]) -> Iterator[str]:
    """Point GRALORA_QUEUE at `<session queue>-api` (consumed by no worker) for the module."""
    queue = f"{service_env['GRALORA_QUEUE']}-api"
    os.environ["GRALORA_QUEUE"] = queue
    reset_service_caches()
    try:
        yield queue
    finally:
        os.environ["GRALORA_QUEUE"] = service_env["GRALORA_QUEUE"]
        reset_service_caches()
