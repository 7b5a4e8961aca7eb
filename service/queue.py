"""Deliver job ids to workers through Celery (the job row stays the truth; a message only wakes
a worker, and a duplicate is harmless because the worker's claim is conditional)."""

from __future__ import annotations

import uuid
from functools import lru_cache
from typing import Any

from celery import Celery

from service.settings import get_settings

RUN_JOB_TASK = "gralora.run_job"


def broker_transport_options(broker_url: str) -> dict[str, Any]:
    """Transport options that suit the broker behind `broker_url` (shared with the worker app)."""
    if broker_url.startswith(("sqla+sqlite", "sqlalchemy+sqlite")):
        # kombu passes these to create_engine: the API and the worker share one SQLite file,
        # so wait for the other writer instead of failing with "database is locked".
        return {"connect_args": {"timeout": 30}}
    if broker_url.startswith(("redis://", "rediss://")):
        # An unacked message comes back after this many seconds. Correctness does not depend
        # on it (a redelivered id meets a held lease and the claim does nothing); it is only
        # high so that long jobs do not keep producing no-op redeliveries.
        return {"visibility_timeout": 12 * 3600}
    return {}


@lru_cache
def _producer_app(broker_url: str) -> Celery:
    """A send-only Celery app (no tasks, no results), one per broker URL."""
    app = Celery("gralora-producer", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # Fail fast: the API must answer quickly, and the reaper re-sends queued jobs whose
        # message never reached the broker.
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=False,
        broker_transport_options={**broker_transport_options(broker_url), "max_retries": 0},
    )
    return app


def get_producer() -> Celery:
    """The send-only Celery app for the configured broker."""
    return _producer_app(get_settings().resolved_broker_url)


def enqueue_job(job_id: uuid.UUID, queue: str) -> None:
    """Send one run_job task for `job_id` to `queue`; raises when the broker is unreachable."""
    get_producer().send_task(RUN_JOB_TASK, args=[str(job_id)], queue=queue, retry=False)


def reset_producer() -> None:
    """Forget cached producer apps (tests change the broker URL between runs)."""
    _producer_app.cache_clear()
