"""Prometheus metrics computed from the database at scrape time (the rows are the truth)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.db import session_scope
from service.models import JOB_STATUSES, TERMINAL_STATUSES, Job

router = APIRouter(tags=["health"])

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)


class JobCollector(Collector):
    """Jobs by status, queue depth, durations of finished jobs, throughput of running ones."""

    def collect(self) -> Iterator[Metric]:
        """Query the database once per scrape."""
        with session_scope() as session:
            by_status: dict[str, int] = {status: count for status, count in session.execute(
                select(Job.status, func.count()).group_by(Job.status))}
            depth: dict[str, int] = {queue: count for queue, count in session.execute(
                select(Job.queue, func.count()).where(Job.status == "queued")
                .group_by(Job.queue))}
            finished = session.execute(
                select(Job.status, Job.started_at, Job.finished_at).where(
                    Job.status.in_(TERMINAL_STATUSES), Job.started_at.is_not(None),
                    Job.finished_at.is_not(None))).all()
            running = session.execute(
                select(Job.started_at, Job.progress).where(
                    Job.status.in_(("running", "cancelling")))).all()

        jobs = GaugeMetricFamily("gralora_jobs", "Jobs in each status.", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs

        queue_depth = GaugeMetricFamily("gralora_queue_depth",
                                        "Queued jobs waiting for a worker.", labels=["queue"])
        for queue, count in sorted(depth.items()):
            queue_depth.add_metric([queue], count)
        yield queue_depth

        durations: dict[str, list[float]] = {}
        for status, started_at, finished_at in finished:
            if started_at is None or finished_at is None:
                continue
            durations.setdefault(status, []).append((finished_at - started_at).total_seconds())
        histogram = HistogramMetricFamily(
            "gralora_job_duration_seconds", "Wall time of finished jobs, start to end.",
            labels=["status"])
        for status in sorted(TERMINAL_STATUSES):
            values = durations.get(status, [])
            buckets = [(_le(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([status], buckets, sum_value=sum(values))
        yield histogram

        now = datetime.now(UTC)
        steps_per_second = 0.0
        tokens_per_second = 0.0
        for started_at, progress in running:
            progress = progress or {}
            step = progress.get("step") or 0
            if started_at is not None and step:
                elapsed = (now - started_at).total_seconds()
                steps_per_second += step / elapsed if elapsed > 0 else 0.0
            tokens_per_second += float(progress.get("tokens_per_second") or 0.0)
        yield GaugeMetricFamily("gralora_training_steps_per_second",
                                "Training steps per second, summed over running jobs.",
                                value=steps_per_second)
        yield GaugeMetricFamily("gralora_training_tokens_per_second",
                                "Tokens per second, summed over running jobs.",
                                value=tokens_per_second)


def _le(bound: float) -> str:
    return f"{bound:g}"


def make_registry() -> CollectorRegistry:
    """A registry holding only the job collector (no global state shared between apps)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector())
    return registry


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
})
def metrics() -> Response:
    """Prometheus metrics: jobs by status, queue depth, job durations, step throughput."""
    return Response(generate_latest(make_registry()), media_type=CONTENT_TYPE_LATEST)
