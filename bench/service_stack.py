"""A private service for a benchmark: a fresh Postgres database, `gralora api`, `gralora worker`.

The processes are the production commands run with this interpreter, on a database created
for the run (migrated with `service.schema.upgrade_to_head`, dropped at the end), the local
Redis as broker with a queue of the run's own, and folders under a temporary root. Nothing of
it is shared with tests or with another benchmark running at the same time.

    with ServiceStack(extra_env={"GRALORA_MAX_ACTIVE_JOBS_PER_OWNER": "1000000"}) as stack:
        url = stack.start_api()
        key = stack.create_api_key("bench")
        worker = stack.start_worker()
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from cli.processes import free_port, gralora_command, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("GRALORA_BENCH_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432")
# Database 2: tests use 1; keys are per-run anyway and removed at the end.
REDIS_URL = os.environ.get("GRALORA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/2")
READY_TIMEOUT = 120.0


def libpq_url(sqlalchemy_url: str) -> str:
    """The same URL without the SQLAlchemy driver suffix (for psycopg.connect)."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set size so far (VmHWM), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class ManagedProcess:
    """A started service process and its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The process id (the group leader of its children)."""
        return self.process.pid

    def log(self) -> str:
        """Everything the process has printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop gracefully, then by force."""
        stop_process_group(self.process)


class ServiceStack:
    """A private database, broker queue and folders, and the API and worker processes on them."""

    def __init__(self, *, extra_env: dict[str, str] | None = None, root: Path | None = None,
                 name: str = "bench") -> None:
        self.token = uuid.uuid4().hex[:12]
        self.database_name = f"gralora_{name}_{self.token}"
        self.database_url = f"{POSTGRES_URL}/{self.database_name}"
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(
            tempfile.mkdtemp(prefix=f"gralora-{name}-"))
        self.folders = {folder: self.root / folder for folder in (
            "data", "artifacts", "checkpoints", "cache", "datasets", "models", "logs")}
        self.env: dict[str, str] = {
            "GRALORA_DATABASE_URL": self.database_url,
            "GRALORA_BROKER_URL": REDIS_URL,
            "GRALORA_QUEUE": f"gralora-bench-{self.token}",
            "GRALORA_DATA_DIR": str(self.folders["data"]),
            "GRALORA_ARTIFACTS_DIR": str(self.folders["artifacts"]),
            "GRALORA_CHECKPOINTS_DIR": str(self.folders["checkpoints"]),
            "GRALORA_CACHE_DIR": str(self.folders["cache"]),
            "GRALORA_DATASET_ROOTS": str(self.folders["datasets"]),
            "GRALORA_MODEL_ROOTS": str(self.folders["models"]),
            **(extra_env or {}),
        }
        self.api_url: str | None = None
        self.processes: list[ManagedProcess] = []
        self._database_created = False

    @property
    def model_root(self) -> Path:
        """The first model root: a local base_model must lie under it."""
        return Path(self.env["GRALORA_MODEL_ROOTS"].split(",")[0])

    @property
    def dataset_root(self) -> Path:
        """A file:// dataset must lie under this folder."""
        return self.folders["datasets"]

    def __enter__(self) -> ServiceStack:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def setup(self) -> None:
        """Create the folders and the database, and migrate it to the newest schema."""
        import psycopg
        from psycopg import sql

        from service.schema import upgrade_to_head

        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        with psycopg.connect(libpq_url(f"{POSTGRES_URL}/postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(
                sql.Identifier(self.database_name)))
        self._database_created = True
        upgrade_to_head(self.database_url)

    def process_env(self, **extra: str) -> dict[str, str]:
        """The environment a service process of this stack runs with."""
        return {**os.environ, **self.env, **extra, "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        log_path = self.folders["logs"] / f"{name}-{len(self.processes)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        managed = ManagedProcess(process, log_path)
        self.processes.append(managed)
        return managed

    def start_api(self, **extra_env: str) -> str:
        """`gralora api` on a free loopback port; returns its base URL once /healthz answers."""
        port = free_port()
        api = self._start("api", gralora_command("api", "--host", "127.0.0.1", "--port",
                                                 str(port)), self.process_env(**extra_env))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if api.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{api.log()[-4000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.api_url = url
        return url

    def start_worker(self, *, preload: Sequence[str] = (), **extra_env: str) -> ManagedProcess:
        """`gralora worker` (one prefork child), returned once Celery says it is ready.

        `preload` names modules the worker's main process imports before it forks its
        children, so that a job's fresh child finds them already loaded.
        """
        argv = gralora_command("worker", "--loglevel", "INFO")
        if preload:
            code = (f"import {', '.join(preload)}; import sys; from cli.main import main; "
                    "sys.exit(main(sys.argv[1:]))")
            argv = [sys.executable, "-c", code, *argv[3:]]
        worker = self._start("worker", argv, self.process_env(**extra_env))
        deadline = time.monotonic() + READY_TIMEOUT
        while " ready." not in worker.log():
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{worker.log()[-4000:]}")
            time.sleep(0.2)
        return worker

    def create_api_key(self, owner: str) -> str:
        """A new API key for `owner` in this stack's database; returns its plaintext."""
        from sqlalchemy.orm import Session

        from service.db import make_engine
        from service.keys import create_key

        engine = make_engine(self.database_url)
        try:
            with Session(engine) as session:
                plaintext, _ = create_key(session, owner=owner)
                session.commit()
        finally:
            engine.dispose()
        return plaintext

    def connect(self) -> Any:
        """A psycopg connection (autocommit) to this stack's database."""
        import psycopg

        return psycopg.connect(libpq_url(self.database_url), autocommit=True)

    def close(self) -> None:
        """Stop every process, drop the database, remove the queue keys and the folders."""
        for managed in reversed(self.processes):
            managed.stop()
        self.processes.clear()
        if self._database_created:
            import psycopg
            from psycopg import sql

            with psycopg.connect(libpq_url(f"{POSTGRES_URL}/postgres"),
                                 autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database_name)))
            self._database_created = False
        try:
            self._delete_queue_keys()
        except Exception:  # noqa: BLE001 - a leftover benchmark message harms nobody
            pass
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _delete_queue_keys(self) -> None:
        """Remove the Redis keys kombu made for this stack's queue."""
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"*{self.token}*", count=1000))
            if keys:
                client.delete(*keys)
            for binding in client.scan_iter(match="_kombu.binding.*", count=1000):
                if self.token.encode() in binding:
                    client.delete(binding)
        finally:
            client.close()
