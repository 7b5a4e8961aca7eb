"""Faults with real processes: kill -9 of a worker, duplicate delivery, a Redis restart."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cli.processes import free_port
from tests.fixtures_db import reset_service_caches
from tests.worker.client import JobsClient


@pytest.fixture
def client(api_server: str, make_api_key: Callable[..., str]) -> JobsClient:
    return JobsClient(api_server, make_api_key())


def job_body(model: Path, dataset: Path, **changes: Any) -> dict[str, Any]:
    return {"base_model": str(model), "dataset_uri": dataset.as_uri(), "rank": 16,
            "batch_size": 4, "max_seq_length": 96, **changes}


def running_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "status" and e["data"].get("status") == "running"]


def test_kill_9_mid_training_resumes_from_the_last_checkpoint(
        client: JobsClient, start_worker: Callable[..., Any], service_model: Path,
        service_datasets: Path) -> None:
    first = start_worker()
    job = client.submit(**job_body(service_model, service_datasets / "chat.jsonl",
                                   max_steps=200, checkpoint_every_steps=10))
    client.wait_until(job["id"], {"running"}, min_step=25)
    first.kill_hard()

    start_worker()  # its reaper finds the expired lease and requeues the job
    done = client.wait_until(job["id"], {"succeeded"}, timeout=300)
    assert done["attempt"] == 2
    assert done["progress"]["step"] == 200
    events = client.events(job["id"])
    assert len(running_events(events)) == 2
    resumed = [e for e in events if e["message"].startswith("resuming from checkpoint")]
    assert resumed, [e["message"] for e in events]
    assert resumed[-1]["data"]["step"] >= 20  # not restarted from step 0


def test_the_same_job_delivered_twice_at_once_is_trained_once(
        client: JobsClient, start_worker: Callable[..., Any], service_model: Path,
        service_datasets: Path, service_env: dict[str, str]) -> None:
    from service.queue import enqueue_job

    start_worker()
    start_worker()
    job = client.submit(**job_body(service_model, service_datasets / "chat.jsonl", max_steps=30))
    enqueue_job(uuid.UUID(job["id"]), service_env["GRALORA_QUEUE"])  # a second delivery
    done = client.wait_until(job["id"], {"succeeded"})
    assert done["attempt"] == 1
    assert len(running_events(client.events(job["id"]))) == 1


class PrivateRedis:
    """A redis-server of this test's own, so restarting it disturbs nothing else."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Like the CI Redis: nothing kept on disk, so a restart loses every message.
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             check=False).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateRedis]:
    """A private Redis, made this process's broker for the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path)
    redis.start()
    monkeypatch.setenv("GRALORA_BROKER_URL", redis.url)
    reset_service_caches()
    yield redis
    redis.stop()
    monkeypatch.undo()
    reset_service_caches()


def job_row(job_id: uuid.UUID) -> tuple[str, int, int]:
    """(status, attempt, step) straight from the database."""
    from service.db import session_scope
    from service.models import Job

    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        return job.status, job.attempt, int((job.progress or {}).get("step") or 0)


def wait_row(job_id: uuid.UUID, predicate: Callable[[str, int, int], bool],
             timeout: float = 180) -> tuple[str, int, int]:
    deadline = time.monotonic() + timeout
    row = job_row(job_id)
    while not predicate(*row):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stuck at {row}")
        time.sleep(0.3)
        row = job_row(job_id)
    return row


def test_a_redis_restart_mid_job_loses_nothing(
        private_redis: PrivateRedis, start_worker: Callable[..., Any], service_model: Path,
        service_datasets: Path) -> None:
    from service.db import session_scope
    from service.jobs import create_job

    def submit(**changes: Any) -> uuid.UUID:
        with session_scope() as session:
            created = create_job(session=session, owner="redis-restart", request=job_body(
                service_model, service_datasets / "chat.jsonl", **changes))
            return created.job.id

    start_worker(GRALORA_BROKER_URL=private_redis.url)
    job_id = submit(max_steps=150, checkpoint_every_steps=10)
    wait_row(job_id, lambda status, _, step: status == "running" and step >= 5)
    private_redis.stop()
    time.sleep(1)
    private_redis.start()  # empty: the delivered message is gone

    status, attempt, step = wait_row(job_id, lambda s, *_: s in ("succeeded", "failed"),
                                     timeout=300)
    assert (status, attempt, step) == ("succeeded", 1, 150)

    # The worker reconnected and takes new work from the restarted broker.
    after = submit(max_steps=5)
    assert wait_row(after, lambda s, *_: s in ("succeeded", "failed"))[0] == "succeeded"


def test_a_queued_job_whose_message_was_lost_is_sent_again(
        start_worker: Callable[..., Any], service_model: Path, service_datasets: Path) -> None:
    from service.db import session_scope
    from service.jobs import create_job

    with session_scope() as session:
        # enqueue=False: the row says queued but no message exists, as after a broker wipe.
        job_id = create_job(session=session, owner="lost-message", enqueue=False,
                            request=job_body(service_model, service_datasets / "chat.jsonl",
                                             max_steps=5)).job.id
    # Stale after 5 leases: 10 s with 2 s leases.
    start_worker(GRALORA_LEASE_SECONDS="2", GRALORA_REAPER_INTERVAL_SECONDS="1")
    status, attempt, _ = wait_row(job_id, lambda s, *_: s in ("succeeded", "failed"), timeout=180)
    assert (status, attempt) == ("succeeded", 1)
