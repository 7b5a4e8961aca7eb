"""Run one job: claim it, train with the engine under a renewed lease, publish, record the outcome.

Each state change is its own short transaction; none is held while training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from gralora.errors import GraloraError, TrainingCancelled
from gralora.export import file_sha256
from gralora.pipeline import (
    Progress,
    TrainHooks,
    TrainRequest,
    TrainResult,
    run_training,
)
from gralora.spec import AdapterSpec, TrainingSpec
from service.db import session_scope
from service.events import append_event
from service.job_runs import (
    add_artifact,
    claim_job,
    finish_job,
    is_cancel_requested,
    record_progress,
    renew_lease,
    update_spec,
)
from service.jobs import check_base_model, check_dataset_uri, source_options
from service.settings import Settings, get_settings
from service.storage import ArtifactStore, get_artifact_store

logger = logging.getLogger(__name__)

T = TypeVar("T")

CANCEL_CHECK_SECONDS = 1.0
ARTIFACT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# File types that do not shrink when deflated; storing them saves minutes on merged models.
STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
INTERNAL_ERROR_MESSAGE = "the worker hit an unexpected error; the job can be submitted again"


def new_worker_id() -> str:
    """A name for this process's claim: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def with_db_retry(write: Callable[[], T], *, what: str, attempts: int = 6,
                  first_delay: float = 0.5) -> T:
    """Run a database write, retrying with backoff while the database is unreachable."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except (OperationalError, DBAPIError) as exc:
            if attempt == attempts:
                raise
            logger.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


class LeaseHeartbeat:
    """A thread that renews the job's lease every lease_seconds / 3 while training runs."""

    def __init__(self, job_id: uuid.UUID, worker_id: str, lease_seconds: float) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the lease is released by finish_job, or expires)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                with session_scope() as session:
                    owned = renew_lease(session=session, job_id=self.job_id,
                                        worker_id=self.worker_id,
                                        lease_seconds=self.lease_seconds)
            except Exception:  # keep trying: the lease has slack for two missed beats
                logger.warning("lease renewal for job %s failed", self.job_id, exc_info=True)
                continue
            if not owned:
                logger.error("job %s: lease lost to another worker or the reaper; stopping",
                             self.job_id)
                self.lost.set()
                return


class JobHooks:
    """Engine hooks that write throttled progress, events and cancel checks to the database."""

    def __init__(self, job_id: uuid.UUID, worker_id: str, heartbeat: LeaseHeartbeat,
                 progress_interval: float) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.heartbeat = heartbeat
        self.progress_interval = progress_interval
        self.last_progress: dict[str, Any] | None = None
        self._last_progress_write = 0.0
        self._last_metrics_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False

    def train_hooks(self) -> TrainHooks:
        """The hooks object the engine takes."""
        return TrainHooks(on_progress=self.on_progress, on_event=self.on_event,
                          should_cancel=self.should_cancel)

    def on_progress(self, progress: Progress) -> None:
        """Keep the latest snapshot; write it at most every progress_interval seconds."""
        self.last_progress = progress.to_dict()
        now = time.monotonic()
        final = progress.total_steps and progress.step >= progress.total_steps
        if not final and now - self._last_progress_write < self.progress_interval:
            return
        self._last_progress_write = now
        self.flush_progress()

    def flush_progress(self) -> None:
        """Write the latest snapshot now (a failed write only loses display, not training)."""
        if self.last_progress is None:
            return
        snapshot = self.last_progress

        def write() -> None:
            with session_scope() as session:
                record_progress(session=session, job_id=self.job_id, worker_id=self.worker_id,
                                progress=snapshot)

        try:
            with_db_retry(write, what=f"progress of job {self.job_id}", attempts=3)
        except Exception:
            logger.warning("could not record progress of job %s", self.job_id, exc_info=True)

    def on_event(self, type: str, level: str, message: str, data: dict[str, Any]) -> None:
        """Append the engine's event to the job's log (metrics at most every progress interval)."""
        if type == "metrics" and not self._metrics_due(data):
            return

        def write() -> None:
            with session_scope() as session:
                append_event(session, job_id=self.job_id, type=type, level=level,
                             message=message, data=data or None)

        try:
            with_db_retry(write, what=f"event of job {self.job_id}", attempts=3)
        except Exception:
            logger.warning("could not record a %s event of job %s", type, self.job_id,
                           exc_info=True)

    def _metrics_due(self, data: dict[str, Any]) -> bool:
        """Throttle per-step metrics: one synchronous insert per step costs up to 16 % of a
        fast step (bench/pipeline.py). The final step is always kept."""
        now = time.monotonic()
        final = bool(data.get("total_steps")) and data.get("step", 0) >= data["total_steps"]
        if not final and now - self._last_metrics_write < self.progress_interval:
            return False
        self._last_metrics_write = now
        return True

    def should_cancel(self) -> bool:
        """True when the lease was lost or a cancel was asked (the DB is read at most 1/s)."""
        if self.heartbeat.lost.is_set():
            return True
        now = time.monotonic()
        if self._cancel or now - self._last_cancel_check < CANCEL_CHECK_SECONDS:
            return self._cancel
        self._last_cancel_check = now
        try:
            with session_scope() as session:
                self._cancel = is_cancel_requested(session=session, job_id=self.job_id)
        except Exception:  # cannot tell: keep training, ask again next time
            logger.warning("cancel check for job %s failed", self.job_id, exc_info=True)
        return self._cancel


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_train_request(job_id: uuid.UUID, spec: dict[str, Any], settings: Settings,
                        output_dir: Path) -> TrainRequest:
    """The engine request for a job spec (flat API fields, or nested adapter/training dicts)."""
    adapter_data = spec.get("adapter")
    if not isinstance(adapter_data, dict):
        adapter_data = {k: spec[k] for k in _fields(AdapterSpec) if k in spec}
    training_data = spec.get("training")
    if not isinstance(training_data, dict):
        training_data = {k: spec[k] for k in _fields(TrainingSpec) if k in spec}
    # The API stores every default explicitly; None means "let the engine choose".
    adapter = AdapterSpec.from_dict({k: v for k, v in adapter_data.items() if v is not None})
    training = TrainingSpec.from_dict({k: v for k, v in training_data.items() if v is not None})
    # Checked again here, before any fetch: settings may have changed since the job was queued.
    base_model = str(spec["base_model"])
    local_model = check_base_model(base_model, settings)
    check_dataset_uri(str(spec["dataset_uri"]), settings, field="dataset_uri")
    if spec.get("validation_uri"):
        check_dataset_uri(str(spec["validation_uri"]), settings, field="validation_uri")
    return TrainRequest(
        base_model=str(local_model) if local_model is not None else base_model,
        dataset_uri=str(spec["dataset_uri"]),
        adapter=adapter,
        training=training,
        output_dir=output_dir,
        # Per job, not per attempt: a new attempt resumes from the latest complete checkpoint.
        checkpoint_dir=settings.resolved_checkpoints_dir / str(job_id),
        validation_uri=spec.get("validation_uri"),
        exports=tuple(spec.get("exports") or ()),
        resume=True,
        # The same options the API checked the job with at submit time.
        sources=source_options(settings),
        model_roots=settings.resolved_model_roots,
        max_dataset_rows=settings.max_dataset_rows,
        fast_forward=settings.fast_forward,
    )


def zip_artifact(source: Path, zip_path: Path) -> str:
    """Zip a folder (its contents at the top) or a single file; returns the kind."""
    with zipfile.ZipFile(zip_path, "w", allowZip64=True) as archive:
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file())
            for path in files:
                archive.write(path, path.relative_to(source).as_posix(),
                              compress_type=_compression(path))
            return "directory"
        archive.write(source, source.name, compress_type=_compression(source))
        return "file"


def _compression(path: Path) -> int:
    return zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED


def publish_artifacts(job_id: uuid.UUID, artifacts: dict[str, Path], store: ArtifactStore,
                      work_dir: Path) -> None:
    """Zip each output, store it as `<job_id>/<name>.zip` and record an Artifact row."""
    for name, source in sorted(artifacts.items()):
        if not ARTIFACT_NAME.match(name) or not source.exists():
            logger.warning("job %s: skipping artifact %r at %s", job_id, name, source)
            continue
        zip_path = work_dir / f"{name}.zip"
        kind = zip_artifact(source, zip_path)
        size, sha256 = zip_path.stat().st_size, file_sha256(zip_path)
        key = f"{job_id}/{name}.zip"
        store.put_file(zip_path, key)
        zip_path.unlink()

        def write(name: str = name, kind: str = kind, size: int = size, sha: str = sha256,
                  key: str = key) -> None:
            with session_scope() as session:
                add_artifact(session=session, job_id=job_id, name=name, kind=kind,
                             size_bytes=size, sha256=sha, storage_key=key)

        with_db_retry(write, what=f"artifact {name} of job {job_id}")


def _resolved_spec(spec: dict[str, Any], result: TrainResult) -> dict[str, Any]:
    """The spec with what the engine chose filled in where the spec left it open."""
    resolved = result.adapter.to_dict()
    updated = dict(spec)
    target = updated.get("adapter") if isinstance(updated.get("adapter"), dict) else updated
    assert isinstance(target, dict)
    for key in ("k", "alpha", "target_modules"):
        if target.get(key) is None and resolved.get(key) is not None:
            target[key] = resolved[key]
    return updated


def _finish(job_id: uuid.UUID, worker_id: str, status: str, *,
            error: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
            progress: dict[str, Any] | None = None) -> None:
    """Record the outcome, retrying while the database is down."""
    def write() -> bool:
        with session_scope() as session:
            return finish_job(session=session, job_id=job_id, worker_id=worker_id,
                              status=status, error=error, metrics=metrics, progress=progress)

    if not with_db_retry(write, what=f"finishing job {job_id}", attempts=10):
        logger.warning("job %s was no longer ours when it ended %s", job_id, status)


def execute_job(job_id: uuid.UUID) -> None:
    """Run a job if it can be claimed; always leaves it finished or recoverable, never stuck."""
    settings = get_settings()
    worker_id = new_worker_id()

    def claim() -> tuple[dict[str, Any], int] | None:
        with session_scope() as session:
            job = claim_job(session=session, job_id=job_id, worker_id=worker_id,
                            lease_seconds=settings.lease_seconds,
                            max_attempts=settings.max_attempts)
            return None if job is None else (dict(job.spec), job.attempt)

    claimed = with_db_retry(claim, what=f"claiming job {job_id}")
    if claimed is None:
        logger.info("job %s is not claimable (already taken or finished); skipping", job_id)
        return
    spec, attempt = claimed
    logger.info("job %s claimed by %s (attempt %s)", job_id, worker_id, attempt)

    heartbeat = LeaseHeartbeat(job_id, worker_id, settings.lease_seconds)
    hooks = JobHooks(job_id, worker_id, heartbeat, settings.progress_interval_seconds)
    heartbeat.start()
    settings.resolved_checkpoints_dir.mkdir(parents=True, exist_ok=True)
    # Beside the checkpoints (same volume, room for merged models), removed when done.
    work_dir = Path(tempfile.mkdtemp(prefix=f".work-{job_id}-",
                                     dir=settings.resolved_checkpoints_dir))
    try:
        request = build_train_request(job_id, spec, settings, work_dir / "output")
        result = run_training(request, hooks.train_hooks())
        if heartbeat.lost.is_set():
            raise TrainingCancelled("lease lost")
        hooks.flush_progress()
        publish_artifacts(job_id, result.artifacts, get_artifact_store(settings), work_dir)

        def save_spec() -> None:
            with session_scope() as session:
                update_spec(session=session, job_id=job_id, worker_id=worker_id,
                            spec=_resolved_spec(spec, result))

        with_db_retry(save_spec, what=f"spec of job {job_id}")
        _finish(job_id, worker_id, "succeeded", metrics=result.metrics,
                progress=hooks.last_progress)
        logger.info("job %s succeeded", job_id)
    except TrainingCancelled:
        if heartbeat.lost.is_set():
            logger.warning("job %s: stopped after losing its lease; its new owner goes on", job_id)
            return
        _finish(job_id, worker_id, "cancelled", progress=hooks.last_progress)
        logger.info("job %s cancelled", job_id)
    except GraloraError as exc:
        _finish(job_id, worker_id, "failed", error=exc.to_dict(), progress=hooks.last_progress)
        logger.info("job %s failed: %s %s", job_id, exc.code, exc.message)
    except (OperationalError, DBAPIError):
        # The database stayed down through every retry. Nothing can be recorded now; the
        # lease expires, the reaper requeues the job and the next attempt resumes from the
        # latest checkpoint, so finished training is not thrown away as a failure.
        logger.exception("job %s: database unreachable; leaving it to the reaper", job_id)
    except Exception:
        # The traceback goes to the log only: it can hold paths and data users must not see.
        logger.exception("job %s failed with an unexpected error", job_id)
        _finish(job_id, worker_id, "failed",
                error={"code": "internal_error", "message": INTERNAL_ERROR_MESSAGE},
                progress=hooks.last_progress)
    finally:
        heartbeat.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
