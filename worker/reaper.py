"""The reaper: a daemon thread in the main worker process that recovers jobs of dead workers."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select

from service.db import session_scope
from service.job_runs import requeue_expired
from service.models import Job
from service.queue import enqueue_job
from service.settings import get_settings

logger = logging.getLogger(__name__)

# A queued job untouched for this many lease periods may have lost its message: re-send it.
STALE_QUEUED_LEASES = 5

_thread: threading.Thread | None = None
_stop = threading.Event()


def reap_once(*, queues: Sequence[str] | None = None,
              now: datetime | None = None) -> list[uuid.UUID]:
    """One pass: requeue or fail jobs whose lease expired, re-send lost messages."""
    settings = get_settings()
    with session_scope() as session:
        job_ids = requeue_expired(
            session=session, now=now, max_attempts=settings.max_attempts, queues=queues,
            stale_queued_after=timedelta(seconds=settings.lease_seconds * STALE_QUEUED_LEASES),
        )
        targets = list(session.execute(select(Job.id, Job.queue).where(Job.id.in_(job_ids))))
    # Send after the commit: a worker that gets the message must see the job queued.
    for job_id, queue in targets:
        enqueue_job(job_id, queue)
        logger.warning("reaper: re-sent job %s to queue %s", job_id, queue)
    return [job_id for job_id, _ in targets]


def _run(queues: Sequence[str] | None, interval: float) -> None:
    """Reap every `interval` seconds until stopped; errors are logged, never fatal."""
    while not _stop.wait(interval):
        try:
            reap_once(queues=queues)
        except Exception:  # a database or broker outage must not kill the reaper
            logger.exception("reaper pass failed; retrying in %s s", interval)


def start_reaper(*, queues: Sequence[str] | None = None, interval: float | None = None) -> None:
    """Start the reaper thread once per process."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    interval = interval or float(get_settings().reaper_interval_seconds)
    _stop.clear()
    _thread = threading.Thread(target=_run, args=(list(queues or []) or None, interval),
                               name="gralora-reaper", daemon=True)
    _thread.start()
    logger.info("reaper started: every %s s on queues %s", interval, queues)


def stop_reaper() -> None:
    """Ask the reaper thread to stop (it is a daemon, so exit never waits on it for long)."""
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
