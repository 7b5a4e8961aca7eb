"""The worker's Celery app: JSON only, late acks, one prefetched message, one job per child.

Why the Redis visibility timeout does not matter here: with late acks an unacked message is
redelivered after the visibility timeout, even while the first worker is still training. The
redelivered id then meets the job's lease, `claim_job` does nothing and the message is acked.
The lease, renewed by a heartbeat and recovered by the reaper, decides who trains a job and
when a dead worker's job runs again; the broker only wakes workers up. The timeout is still set
high (service.queue.broker_transport_options) so long jobs do not cause no-op redeliveries.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from service.queue import broker_transport_options
from service.settings import Settings, get_settings


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for training jobs from `settings`."""
    settings = settings or get_settings()
    broker_url = settings.resolved_broker_url
    app = Celery("gralora", broker=broker_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # Ack only after the task returns, and put the message back if the child dies, so a
        # crash never loses the delivery (a duplicate is harmless: the claim is conditional).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job at a time per worker process: never hold a second message while training.
        worker_prefetch_multiplier=1,
        # A fresh child per job, so the GPU and host memory of a finished job are returned.
        worker_max_tasks_per_child=1,
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Keep training through a broker reconnect; the lease, not the broker, owns the job.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options=broker_transport_options(broker_url),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = create_celery_app()


@worker_init.connect
def _preload_training_libraries(**_: Any) -> None:
    """Import torch, transformers and peft once in the main process, before the pool forks.

    Every job gets a fresh child (max_tasks_per_child=1); forked from a parent that already
    imported them, a child starts training seconds sooner (bench/pipeline.py: 8.6 s from
    submit to first step, 7.6 s of it imports). Importing torch does not initialise CUDA, so
    children still set up their own GPU context.
    """
    import peft  # noqa: F401

    import gralora.pipeline  # noqa: F401
    import gralora.train  # noqa: F401


@worker_process_init.connect
def _fresh_database_pool(**_: Any) -> None:
    """A forked child must not reuse the parent's pooled database connections."""
    from service.db import get_engine

    get_engine().dispose(close=False)


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """Start the reaper in the main worker process (no extra process to run)."""
    from worker.reaper import start_reaper

    queues = _consumed_queues(sender)
    start_reaper(queues=queues)


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    """Stop the reaper thread when the worker shuts down."""
    from worker.reaper import stop_reaper

    stop_reaper()


def _consumed_queues(consumer: Any) -> list[str]:
    """Names of the queues this worker consumes (`-Q`), else the default queue."""
    try:
        names = list(consumer.app.amqp.queues.consume_from or [])
    except AttributeError:
        names = []
    return names or [get_settings().queue]
