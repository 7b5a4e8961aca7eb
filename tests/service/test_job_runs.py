"""Worker-side state changes on real Postgres: claims, leases, outcomes and the reaper."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import get_sessionmaker, session_scope
from service.job_runs import (
    WORKER_LOST,
    claim_job,
    finish_job,
    record_progress,
    renew_lease,
    requeue_expired,
)
from service.models import Job, JobEvent
from worker.reaper import reap_once

LEASE = 60.0
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def queue(service_env: dict[str, str]) -> Iterator[str]:
    """A queue of this test's own: the reaper is scoped to it and no worker consumes it."""
    name = f"{service_env['GRALORA_QUEUE']}-runs-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(service_env["GRALORA_BROKER_URL"])
    client.delete(name)
    client.close()


def new_job(session: Session, queue: str, *, status: str = "queued", **values: Any) -> Job:
    job = Job(owner="runner-tests", status=status, spec={"rank": 16}, user_metadata={},
              queue=queue, created_at=T0, updated_at=values.pop("updated_at", T0), **values)
    session.add(job)
    session.commit()
    return job


def reload(session: Session, job: Job) -> Job:
    session.expire_all()
    row = session.get(Job, job.id)
    assert row is not None
    return row


def claim(job: Job, worker: str, now: datetime, max_attempts: int | None = None) -> Job | None:
    """One claim in its own committed transaction, as the worker does it."""
    with session_scope() as session:
        return claim_job(session=session, job_id=job.id, worker_id=worker, lease_seconds=LEASE,
                         max_attempts=max_attempts, now=now)


def reap(queue: str, now: datetime, max_attempts: int = 3,
         stale_after: timedelta | None = None) -> list[uuid.UUID]:
    with session_scope() as session:
        return requeue_expired(session=session, now=now, max_attempts=max_attempts,
                               queues=[queue], stale_queued_after=stale_after)


# --- claim ----------------------------------------------------------------------------------


def test_claim_takes_a_queued_job_with_a_lease(db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue)

    claimed = claim(job, "worker-a", T0)

    assert claimed is not None
    row = reload(db_session, job)
    assert row.status == "running" and row.attempt == 1
    assert row.lease_owner == "worker-a"
    assert row.lease_expires_at == T0 + timedelta(seconds=LEASE)
    assert row.started_at == T0
    events = db_session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
    assert [e.data["status"] for e in events if e.data] == ["running"]


def test_second_claim_does_nothing_while_the_lease_holds(db_session: Session,
                                                         queue: str) -> None:
    job = new_job(db_session, queue)
    assert claim(job, "worker-a", T0) is not None

    again = claim(job, "worker-b", T0 + timedelta(seconds=LEASE - 1))

    assert again is None
    row = reload(db_session, job)
    assert row.lease_owner == "worker-a" and row.attempt == 1


def test_expired_lease_can_be_claimed_by_another_worker(db_session: Session,
                                                        queue: str) -> None:
    job = new_job(db_session, queue)
    claim(job, "worker-a", T0)

    later = T0 + timedelta(seconds=LEASE + 1)
    taken = claim(job, "worker-b", later)

    assert taken is not None
    row = reload(db_session, job)
    assert row.lease_owner == "worker-b" and row.attempt == 2
    assert row.started_at == T0  # the first start is kept
    assert row.lease_expires_at == later + timedelta(seconds=LEASE)


def test_expired_lease_past_max_attempts_is_not_claimed(db_session: Session,
                                                        queue: str) -> None:
    job = new_job(db_session, queue, status="running", attempt=3, lease_owner="dead",
                  lease_expires_at=T0)

    assert claim(job, "worker-b", T0 + timedelta(seconds=1), max_attempts=3) is None
    assert reload(db_session, job).lease_owner == "dead"


@pytest.mark.parametrize("status", ["cancelling", "cancelled", "succeeded", "failed",
                                    "validating_files"])
def test_claim_refuses_jobs_that_are_not_queued(db_session: Session, queue: str,
                                                status: str) -> None:
    # Even with a lapsed lease: a cancelling job is the reaper's to end, not to rerun.
    job = new_job(db_session, queue, status=status, lease_owner="old",
                  lease_expires_at=T0 - timedelta(hours=1))

    assert claim(job, "worker-b", T0) is None
    row = reload(db_session, job)
    assert row.status == status and row.attempt == 0 and row.lease_owner == "old"


def test_concurrent_claims_have_one_winner(db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue)
    workers = 8
    barrier = threading.Barrier(workers)
    results: dict[str, bool] = {}

    def race(worker: str) -> None:
        session = get_sessionmaker()()
        try:
            barrier.wait()
            results[worker] = claim_job(session=session, job_id=job.id, worker_id=worker,
                                        lease_seconds=LEASE, now=T0) is not None
            session.commit()
        finally:
            session.close()

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [worker for worker, won in results.items() if won]
    assert len(results) == workers and len(winners) == 1
    row = reload(db_session, job)
    assert row.lease_owner == winners[0] and row.attempt == 1


# --- lease, progress, outcome ---------------------------------------------------------------


def test_lease_renewal_only_for_the_owner(db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue)
    claim(job, "worker-a", T0)
    later = T0 + timedelta(seconds=LEASE / 2)

    with session_scope() as session:
        assert renew_lease(session=session, job_id=job.id, worker_id="worker-a",
                           lease_seconds=LEASE, now=later)
        assert not renew_lease(session=session, job_id=job.id, worker_id="worker-b",
                               lease_seconds=LEASE, now=later)

    assert reload(db_session, job).lease_expires_at == later + timedelta(seconds=LEASE)


def test_a_renewed_lease_is_not_reaped_or_claimed(db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue)
    claim(job, "worker-a", T0)
    renewed_at = T0 + timedelta(seconds=LEASE - 5)
    with session_scope() as session:
        renew_lease(session=session, job_id=job.id, worker_id="worker-a", lease_seconds=LEASE,
                    now=renewed_at)

    after_first_lease = T0 + timedelta(seconds=LEASE + 5)
    assert reap(queue, after_first_lease) == []
    assert claim(job, "worker-b", after_first_lease) is None
    assert reload(db_session, job).lease_owner == "worker-a"


def test_renewal_fails_once_the_job_is_finished_or_reaped(db_session: Session,
                                                          queue: str) -> None:
    finished, reaped = new_job(db_session, queue), new_job(db_session, queue)
    claim(finished, "worker-a", T0)
    claim(reaped, "worker-a", T0)
    with session_scope() as session:
        assert finish_job(session=session, job_id=finished.id, worker_id="worker-a",
                          status="succeeded", metrics={"train_loss": 0.5})
    reap(queue, T0 + timedelta(seconds=LEASE + 1))

    with session_scope() as session:
        for job in (finished, reaped):
            assert not renew_lease(session=session, job_id=job.id, worker_id="worker-a",
                                   lease_seconds=LEASE)
            assert not record_progress(session=session, job_id=job.id, worker_id="worker-a",
                                       progress={"step": 1})
        # A worker whose lease was reaped cannot overwrite the outcome either.
        assert not finish_job(session=session, job_id=reaped.id, worker_id="worker-a",
                              status="succeeded")

    row = reload(db_session, finished)
    assert row.status == "succeeded" and row.lease_owner is None and row.finished_at
    assert row.metrics == {"train_loss": 0.5}
    assert reload(db_session, reaped).status == "queued"


def test_cancelling_job_keeps_its_lease_until_the_worker_stops(db_session: Session,
                                                               queue: str) -> None:
    job = new_job(db_session, queue)
    claim(job, "worker-a", T0)
    row = reload(db_session, job)
    row.status, row.cancel_requested = "cancelling", True
    db_session.commit()

    with session_scope() as session:
        assert renew_lease(session=session, job_id=job.id, worker_id="worker-a",
                           lease_seconds=LEASE, now=T0)
        assert finish_job(session=session, job_id=job.id, worker_id="worker-a",
                          status="cancelled")
    assert reload(db_session, job).status == "cancelled"


# --- reaper ---------------------------------------------------------------------------------


def test_reaper_requeues_expired_leases_and_the_next_claim_counts_an_attempt(
        db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue)
    healthy = new_job(db_session, queue)
    claim(job, "worker-dead", T0)
    claim(healthy, "worker-alive", T0 + timedelta(seconds=30))
    now = T0 + timedelta(seconds=LEASE + 1)

    assert reap(queue, now) == [job.id]

    row = reload(db_session, job)
    assert row.status == "queued" and row.lease_owner is None and row.lease_expires_at is None
    assert row.attempt == 1 and row.queued_at == now
    assert reload(db_session, healthy).status == "running"
    last = db_session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                              .order_by(JobEvent.seq.desc())).first()
    assert last is not None and last.level == "warning" and "requeued" in last.message
    assert claim(job, "worker-new", now) is not None
    assert reload(db_session, job).attempt == 2


def test_worker_lost_after_max_attempts(db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue)
    now = T0
    for attempt in range(1, 4):
        assert claim(job, f"worker-{attempt}", now, max_attempts=3) is not None
        now += timedelta(seconds=LEASE + 1)  # the worker dies; its lease lapses
        sent = reap(queue, now, max_attempts=3)
        assert sent == ([job.id] if attempt < 3 else [])

    row = reload(db_session, job)
    assert row.status == "failed" and row.attempt == 3 and row.finished_at == now
    assert row.error is not None and row.error["code"] == WORKER_LOST
    assert "3" in row.error["message"]
    assert claim(job, "worker-4", now, max_attempts=3) is None


def test_reaper_ends_a_job_whose_worker_died_while_cancelling(db_session: Session,
                                                              queue: str) -> None:
    job = new_job(db_session, queue, status="cancelling", cancel_requested=True, attempt=1,
                  lease_owner="dead", lease_expires_at=T0)

    assert reap(queue, T0 + timedelta(seconds=1)) == []

    row = reload(db_session, job)
    assert row.status == "cancelled" and row.finished_at is not None and row.error is None


def test_reaper_resends_queued_jobs_whose_message_may_be_lost(db_session: Session,
                                                              queue: str) -> None:
    stale = new_job(db_session, queue, updated_at=T0)
    fresh = new_job(db_session, queue, updated_at=T0 + timedelta(minutes=9))
    cancelled = new_job(db_session, queue, cancel_requested=True, updated_at=T0)
    now = T0 + timedelta(minutes=10)

    first = reap(queue, now, stale_after=timedelta(minutes=5))
    second = reap(queue, now + timedelta(seconds=1), stale_after=timedelta(minutes=5))

    assert first == [stale.id]
    assert second == []  # touched: re-sent once per period, not on every pass
    assert fresh.id not in first and cancelled.id not in first
    assert reload(db_session, stale).status == "queued"


def test_reaper_leaves_other_queues_alone(db_session: Session, queue: str) -> None:
    job = new_job(db_session, queue, status="running", attempt=1, lease_owner="dead",
                  lease_expires_at=T0)

    assert reap(f"{queue}-elsewhere", T0 + timedelta(seconds=1)) == []
    assert reload(db_session, job).status == "running"


def test_reap_once_requeues_and_sends_the_job_to_redis(db_session: Session, queue: str,
                                                       service_env: dict[str, str]) -> None:
    job = new_job(db_session, queue, status="running", attempt=1, lease_owner="dead",
                  lease_expires_at=T0)

    sent = reap_once(queues=[queue], now=T0 + timedelta(seconds=1))

    assert sent == [job.id]
    assert reload(db_session, job).status == "queued"
    client = redis.Redis.from_url(os.environ["GRALORA_BROKER_URL"])
    try:
        messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()
    assert [m["headers"]["task"] for m in messages] == ["gralora.run_job"]
    assert str(job.id) in messages[0]["headers"]["argsrepr"]
