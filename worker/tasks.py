"""Celery tasks: each receives only a job id and calls a plain function."""

from __future__ import annotations

import logging
import uuid

from service.queue import RUN_JOB_TASK
from worker.celery_app import app
from worker.runner import execute_job

logger = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run one training job; the job row says what to do and records how it went."""
    try:
        parsed = uuid.UUID(str(job_id))
    except ValueError:
        # A retry could never succeed; drop the message.
        logger.error("run_job got a malformed job id %r; ignoring it", job_id)
        return
    execute_job(parsed)
