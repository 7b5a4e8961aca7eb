"""Worker-side job state changes: claim with a lease, heartbeat, progress, outcome, recovery.

Every function runs inside the caller's short transaction and changes a job with one
conditional UPDATE, so two workers (or a worker and the reaper) can never both win.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.events import append_event
from service.models import Artifact, Job, utcnow

# A worker owns a job in these states while its lease is valid.
LEASED_STATUSES = ("running", "cancelling")
OUTCOMES = ("succeeded", "failed", "cancelled")
WORKER_LOST = "worker_lost"


def claim_job(*, session: Session, job_id: uuid.UUID, worker_id: str, lease_seconds: float,
              max_attempts: int | None = None, now: datetime | None = None) -> Job | None:
    """Take the job for `worker_id` if it is queued or its lease expired; None if not claimable.

    `max_attempts` stops a job whose worker died from being taken again past the limit (the
    reaper then fails it with `worker_lost`).
    """
    now = now or utcnow()
    expired = and_(Job.status == "running", Job.lease_expires_at < now)
    if max_attempts is not None:
        expired = and_(expired, Job.attempt < max_attempts)
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, or_(Job.status == "queued", expired))
        .values(
            status="running",
            started_at=func.coalesce(Job.started_at, now),
            attempt=Job.attempt + 1,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(Job.attempt)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed is None:
        return None
    append_event(session, job_id=job_id, type="status", message=f"running (attempt {claimed})",
                 data={"status": "running", "attempt": claimed, "worker": worker_id})
    return session.get(Job, job_id, populate_existing=True)


def renew_lease(*, session: Session, job_id: uuid.UUID, worker_id: str, lease_seconds: float,
                now: datetime | None = None) -> bool:
    """Extend the lease; False when the job is no longer ours (finished, reaped, re-claimed)."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(LEASED_STATUSES))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_progress(*, session: Session, job_id: uuid.UUID, worker_id: str,
                    progress: dict[str, Any]) -> bool:
    """Store the latest progress snapshot (callers throttle); False when the job is not ours."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(LEASED_STATUSES))
        .values(progress=progress, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def update_spec(*, session: Session, job_id: uuid.UUID, worker_id: str,
                spec: dict[str, Any]) -> bool:
    """Replace the job's spec (the worker fills in what the engine resolved: k, alpha...)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(LEASED_STATUSES))
        .values(spec=spec)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def is_cancel_requested(*, session: Session, job_id: uuid.UUID) -> bool:
    """Whether someone asked to cancel the job (a missing job counts as cancelled)."""
    row = session.execute(
        select(Job.cancel_requested, Job.status).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return True
    return bool(row.cancel_requested) or row.status in ("cancelling", "cancelled")


def finish_job(*, session: Session, job_id: uuid.UUID, worker_id: str, status: str,
               error: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               progress: dict[str, Any] | None = None) -> bool:
    """Record the outcome and drop the lease; False when the job was no longer ours."""
    if status not in OUTCOMES:
        raise ValueError(f"status must be one of {OUTCOMES}, got {status!r}")
    now = utcnow()
    values: dict[str, Any] = {
        "status": status, "error": error, "finished_at": now, "updated_at": now,
        "lease_owner": None, "lease_expires_at": None,
    }
    if metrics is not None:
        values["metrics"] = metrics
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(LEASED_STATUSES))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    message = status if error is None else f"{status}: {error.get('message', '')}"
    append_event(session, job_id=job_id, type="status", message=message,
                 level="error" if status == "failed" else "info",
                 data={"status": status, "error": error})
    return True


def add_artifact(*, session: Session, job_id: uuid.UUID, name: str, kind: str, size_bytes: int,
                 sha256: str, storage_key: str) -> Artifact:
    """Record a stored artifact (replacing one of the same name from an earlier attempt)."""
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    artifact = Artifact(job_id=job_id, name=name, kind=kind, size_bytes=size_bytes,
                        sha256=sha256, storage_key=storage_key)
    session.add(artifact)
    session.flush()
    append_event(session, job_id=job_id, type="artifact", message=f"artifact {name} stored",
                 data={"name": name, "kind": kind, "size_bytes": size_bytes, "sha256": sha256})
    return artifact


def requeue_expired(*, session: Session, now: datetime | None = None, max_attempts: int,
                    stale_queued_after: timedelta | None = None,
                    queues: Sequence[str] | None = None) -> list[uuid.UUID]:
    """Recover jobs whose worker vanished; returns the ids whose message must be (re)sent.

    A running job with an expired lease goes back to `queued` (its next claim counts an
    attempt), or fails with `worker_lost` once it used `max_attempts`; a job that was being
    cancelled ends `cancelled`. A job queued for longer than `stale_queued_after` may have lost
    its message (e.g. Redis restarted without persistence): it is re-sent, which is harmless
    because a duplicate delivery meets a claim that does nothing.
    """
    now = now or utcnow()
    in_scope = Job.queue.in_(list(queues)) if queues else None
    query = select(Job.id, Job.status, Job.attempt, Job.cancel_requested).where(
        Job.status.in_(LEASED_STATUSES), Job.lease_expires_at < now
    )
    if in_scope is not None:
        query = query.where(in_scope)
    to_send: list[uuid.UUID] = []
    for job_id, status, attempt, cancel_requested in session.execute(query).all():
        if status == "cancelling" or cancel_requested:
            outcome: dict[str, Any] = {"status": "cancelled", "finished_at": now, "error": None}
            message = "cancelled (its worker stopped while cancelling)"
        elif attempt >= max_attempts:
            error = {"code": WORKER_LOST,
                     "message": f"the worker running this job stopped responding {attempt} "
                                f"time(s); giving up after {max_attempts} attempts"}
            outcome = {"status": "failed", "finished_at": now, "error": error}
            message = f"failed: {error['message']}"
        else:
            outcome = {"status": "queued", "queued_at": now}
            message = f"requeued: the worker's lease expired (attempt {attempt} of {max_attempts})"
        # Conditional on the same expired lease, so a late heartbeat or a concurrent reaper wins
        # or loses as a whole.
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == status, Job.lease_expires_at < now)
            .values(lease_owner=None, lease_expires_at=None, updated_at=now, **outcome)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if not changed:
            continue
        append_event(session, job_id=job_id, type="status", message=message,
                     level="warning" if outcome["status"] == "queued" else "error",
                     data={"status": outcome["status"], "error": outcome.get("error")})
        if outcome["status"] == "queued":
            to_send.append(job_id)

    if stale_queued_after is not None:
        cutoff = now - stale_queued_after
        stale = update(Job).where(
            Job.status == "queued",
            Job.updated_at < cutoff,
            Job.cancel_requested.is_(False),
        )
        if in_scope is not None:
            stale = stale.where(in_scope)
        # Touch updated_at so the same job is re-sent once per period, not on every pass.
        resent = session.execute(
            stale.values(updated_at=now).returning(Job.id)
            .execution_options(synchronize_session=False)
        ).scalars().all()
        to_send.extend(job_id for job_id in resent if job_id not in to_send)
    return to_send
