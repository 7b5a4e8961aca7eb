"""Alembic migrations on fresh Postgres databases: up, down, up again, and match the models."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db import make_engine
from service.models import Base
from service.schema import current_revision, downgrade, head_revision, upgrade_to_head
from tests.fixtures_db import create_database, drop_database

TABLES = {"api_keys", "jobs", "job_events", "artifacts"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def empty_database(service_env: dict[str, str]) -> Iterator[str]:
    """The URL of a new, empty database (dropped afterwards)."""
    name = f"gralora_migrate_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    assert current_revision(empty_database) is None

    upgrade_to_head(empty_database)
    assert current_revision(empty_database) == head_revision()
    assert tables(empty_database) == TABLES | {"alembic_version"}

    downgrade(empty_database, "base")
    assert current_revision(empty_database) is None
    assert tables(empty_database) <= {"alembic_version"}

    upgrade_to_head(empty_database)
    assert current_revision(empty_database) == head_revision()
    assert tables(empty_database) == TABLES | {"alembic_version"}


def test_upgrade_twice_is_a_no_op(empty_database: str) -> None:
    upgrade_to_head(empty_database)
    upgrade_to_head(empty_database)
    assert current_revision(empty_database) == head_revision()


def test_migrated_schema_matches_the_models(empty_database: str) -> None:
    upgrade_to_head(empty_database)
    engine = make_engine(empty_database)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_gralora_migrate_command_upgrades_the_configured_database(empty_database: str) -> None:
    env = {**os.environ, "GRALORA_DATABASE_URL": empty_database}

    result = subprocess.run([sys.executable, "-m", "cli.main", "migrate"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert f"database at revision {head_revision()}" in result.stdout
    assert tables(empty_database) == TABLES | {"alembic_version"}


def test_service_code_never_creates_tables_itself() -> None:
    # The schema has one owner, Alembic; create_all would hide a missing migration.
    offenders = [str(path.relative_to(REPO)) for folder in ("api", "service", "worker", "cli")
                 for path in (REPO / folder).rglob("*.py") if "create_all(" in path.read_text()]
    assert offenders == []
