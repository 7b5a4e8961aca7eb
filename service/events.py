"""Append to and read a job's event log."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import JobEvent

EVENT_TYPES = (
    "status", "dataset", "preflight", "metrics", "eval", "checkpoint", "artifact", "message",
    "error",
)


def append_event(session: Session, *, job_id: uuid.UUID, type: str, message: str,
                 level: str = "info", data: dict[str, Any] | None = None) -> JobEvent:
    """Add one event to the job's log (flushed, so `seq` is assigned)."""
    event = JobEvent(job_id=job_id, type=type, message=message, level=level, data=data)
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, *, job_id: uuid.UUID, after: int | None = None,
                limit: int = 100) -> tuple[list[JobEvent], bool]:
    """Events of a job in order, after the given seq; returns (events, has_more)."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.seq > after)
    rows = list(session.scalars(query.order_by(JobEvent.seq).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
