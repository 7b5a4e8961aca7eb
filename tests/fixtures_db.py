"""Database fixtures: a fresh Postgres database per test session, migrated with Alembic.

Loaded as a pytest plugin by tests/conftest.py. Everything talks to the real PostgreSQL and
Redis on 127.0.0.1 (override with GRALORA_TEST_POSTGRES_URL / GRALORA_TEST_REDIS_URL).

Fixtures:

- `service_env` (session): creates database `gralora_test_<hex>` (dropped at the end), runs the
  Alembic upgrade to head through `service.schema.upgrade_to_head` (the code path of
  `gralora migrate`), and sets, in os.environ for the whole session:
  GRALORA_DATABASE_URL (postgresql+psycopg://.../<that database>), GRALORA_BROKER_URL
  (redis://.../<TEST_REDIS_DB>), GRALORA_QUEUE (unique per session, so concurrent sessions
  never take each other's messages), GRALORA_DATA_DIR, GRALORA_ARTIFACTS_DIR,
  GRALORA_CHECKPOINTS_DIR, GRALORA_CACHE_DIR, GRALORA_DATASET_ROOTS and GRALORA_MODEL_ROOTS
  (temporary folders). Yields that dict; pass `{**os.environ, **service_env}` to a subprocess
  (e.g. a Celery worker) to put it on the same database, broker and queue. Service caches
  (settings, engine, Celery producer) are reset when the environment changes.
- `db_session` (function): a SQLAlchemy Session on the test database. Changes are real: commit
  them so the API (or a worker) sees them. Closed after the test.
- `make_api_key` (function): `make_api_key(owner=None) -> str` creates and commits a key and
  returns its plaintext; without an owner, a fresh unique owner is made.
- `api_client` (function): a FastAPI TestClient on `api.app:create_app()`.
- `dataset_file` (function): a small valid JSONL chat dataset under the dataset root;
  `model_dir` (session): a folder with a config.json under the model root.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy.orm import Session

POSTGRES_URL = os.environ.get("GRALORA_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("GRALORA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
TEST_REDIS_DB = 1


def _libpq_url(sqlalchemy_url: str) -> str:
    """The same URL without the SQLAlchemy driver suffix (psycopg.connect wants plain libpq)."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def reset_service_caches() -> None:
    """Forget cached settings, engines and Celery producers (after changing the environment)."""
    from service.db import reset_caches
    from service.queue import reset_producer

    reset_caches()
    reset_producer()


def create_database(name: str) -> str:
    """Create database `name` on the test server; returns its SQLAlchemy URL."""
    with psycopg.connect(_libpq_url(f"{POSTGRES_URL}/postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{POSTGRES_URL}/{name}"


def drop_database(name: str) -> None:
    """Drop database `name`, disconnecting whoever still holds a connection (a worker...)."""
    with psycopg.connect(_libpq_url(f"{POSTGRES_URL}/postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def _delete_queue_keys(broker_url: str, token: str) -> None:
    """Remove the Redis keys kombu made for this session's queues."""
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        keys = list(client.scan_iter(match=f"*{token}*", count=1000))
        if keys:
            client.delete(*keys)
        for binding in client.scan_iter(match="_kombu.binding.*", count=1000):
            if token.encode() in binding:
                client.delete(binding)
    finally:
        client.close()


@pytest.fixture(scope="session")
def service_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A migrated fresh database, the Redis broker and temporary folders, set in os.environ."""
    from service.schema import upgrade_to_head

    token = uuid.uuid4().hex[:12]
    name = f"gralora_test_{token}"
    database_url = create_database(name)
    root = tmp_path_factory.mktemp("service")
    folders = {folder: root / folder for folder in ("data", "artifacts", "checkpoints", "cache",
                                                    "datasets", "models")}
    for folder in folders.values():
        folder.mkdir()
    broker_url = f"{REDIS_URL}/{TEST_REDIS_DB}"
    env = {
        "GRALORA_DATABASE_URL": database_url,
        "GRALORA_BROKER_URL": broker_url,
        "GRALORA_QUEUE": f"gralora-test-{token}",
        "GRALORA_DATA_DIR": str(folders["data"]),
        "GRALORA_ARTIFACTS_DIR": str(folders["artifacts"]),
        "GRALORA_CHECKPOINTS_DIR": str(folders["checkpoints"]),
        "GRALORA_CACHE_DIR": str(folders["cache"]),
        "GRALORA_DATASET_ROOTS": str(folders["datasets"]),
        "GRALORA_MODEL_ROOTS": str(folders["models"]),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    reset_service_caches()
    try:
        upgrade_to_head(database_url)
        yield env
    finally:
        reset_service_caches()  # closes pooled connections before the drop
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        drop_database(name)
        try:
            _delete_queue_keys(broker_url, token)
        except Exception:  # noqa: BLE001 - leftover test messages are harmless
            pass


@pytest.fixture
def db_session(service_env: dict[str, str]) -> Iterator[Session]:
    """A session on the test database; commit what the API or a worker must see."""
    from service.db import get_sessionmaker

    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


@pytest.fixture
def make_api_key(service_env: dict[str, str]) -> Callable[..., str]:
    """A factory: `make_api_key(owner=None) -> plaintext key` (committed)."""
    from service.db import session_scope
    from service.keys import create_key

    def make(owner: str | None = None) -> str:
        with session_scope() as session:
            plaintext, _ = create_key(session, owner=owner or f"owner-{uuid.uuid4().hex[:10]}")
        return plaintext

    return make


@pytest.fixture
def api_client(service_env: dict[str, str]) -> Iterator[TestClient]:
    """A TestClient on a new API app (its settings are those of os.environ at call time)."""
    from api.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def model_dir(service_env: dict[str, str]) -> Path:
    """A folder under the model root holding only a small Llama config.json (no weights)."""
    folder = Path(service_env["GRALORA_MODEL_ROOTS"]) / "config-only"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 512,
    }))
    return folder


@pytest.fixture
def dataset_file(service_env: dict[str, str]) -> Path:
    """A valid two-line JSONL chat dataset under the dataset root."""
    path = Path(service_env["GRALORA_DATASET_ROOTS"]) / f"chat-{uuid.uuid4().hex[:8]}.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
