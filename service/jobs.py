"""Job service: build the full spec, create, read, list, cancel. Plain functions, no HTTP.

k is chosen at submit time. For a local base model under the model roots, the model's
config.json is read (no weights) through `gralora.preflight`, so k also divides every targeted
layer size and target_modules is filled in. For a hub model the sizes are unknown before the
worker loads the config, so k is the paper's choice for the rank (`choose_k(rank, [])`); the
worker's preflight checks divisibility again and fails the job with `preflight_failed` if it
does not hold.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import func, literal, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gralora.errors import DatasetRefused, GraloraError, ModelUnavailable
from gralora.pipeline import SourceOptions
from gralora.preflight import preflight
from gralora.sources import check_dataset_uri as check_engine_dataset_uri
from gralora.spec import AdapterSpec, ExportSpec, TrainingSpec, choose_k
from service.errors import (
    IdempotencyConflict,
    InvalidRequest,
    JobNotCancellable,
    JobNotFound,
    ModelRefused,
    TooManyActiveJobs,
)
from service.events import append_event, list_events
from service.models import TERMINAL_STATUSES, Artifact, Job, JobEvent, utcnow
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 100
ACTIVE_STATUSES = ("validating_files", "queued", "running", "cancelling")
# A hub id: "name" or "org/name", no path tricks.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Artifact names as the worker writes them (adapter, merged, lora, manifest...).
ARTIFACT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class JobLimits(BaseSettings):
    """Bounds on job requests, from GRALORA_MAX_* variables; the defaults suit one GPU host."""

    model_config = SettingsConfigDict(env_prefix="GRALORA_", env_file=None, extra="ignore")

    max_rank: int = 1024
    max_k: int = 64
    max_hybrid_rank: int = 1024
    max_epochs: float = 100.0
    max_train_steps: int = 1_000_000
    max_sequence_length: int = 32_768
    max_batch_size: int = 1024
    max_gradient_accumulation_steps: int = 1024
    max_metadata_pairs: int = 16
    max_metadata_key_length: int = 64
    max_metadata_value_length: int = 512
    max_active_jobs_per_owner: int = 16
    max_request_bytes: int = 64 * 1024


def get_limits() -> JobLimits:
    """Current request limits (read from the environment each call; cheap)."""
    return JobLimits()


# Request fields with their defaults, in contract order. The spec is this dict, filled in.
ADAPTER_DEFAULTS: dict[str, Any] = {
    "k": None, "hybrid_rank": 0, "alpha": None, "dropout": 0.05, "target_modules": None,
}
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 1.0, "max_steps": None, "learning_rate": 2e-4, "batch_size": 8,
    "gradient_accumulation_steps": 1, "max_seq_length": 1024, "seed": 42,
    "checkpoint_every_steps": None,
}
REQUEST_FIELDS = (
    "base_model", "dataset_uri", "rank", *ADAPTER_DEFAULTS, *TRAINING_DEFAULTS,
    "validation_uri", "exports", "metadata",
)


def request_hash(request: dict[str, Any]) -> str:
    """sha256 of the canonical JSON form of a request body (for Idempotency-Key checks)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_limits(request: dict[str, Any], limits: JobLimits) -> None:
    """Refuse values beyond the configured bounds (InvalidRequest naming the field)."""
    maxima: dict[str, float] = {
        "rank": limits.max_rank, "k": limits.max_k, "hybrid_rank": limits.max_hybrid_rank,
        "epochs": limits.max_epochs, "max_steps": limits.max_train_steps,
        "max_seq_length": limits.max_sequence_length, "batch_size": limits.max_batch_size,
        "gradient_accumulation_steps": limits.max_gradient_accumulation_steps,
        "checkpoint_every_steps": limits.max_train_steps,
    }
    for name, maximum in maxima.items():
        value = request.get(name)
        if value is not None and value > maximum:
            raise InvalidRequest(f"{name} must be at most {maximum:g}, got {value}", field=name)
    metadata = request.get("metadata") or {}
    if len(metadata) > limits.max_metadata_pairs:
        raise InvalidRequest(
            f"metadata holds at most {limits.max_metadata_pairs} pairs, got {len(metadata)}",
            field="metadata")
    for key, value in metadata.items():
        if not key or len(key) > limits.max_metadata_key_length:
            raise InvalidRequest(
                f"metadata keys must be 1 to {limits.max_metadata_key_length} characters",
                field="metadata")
        if len(value) > limits.max_metadata_value_length:
            raise InvalidRequest(
                f"metadata value for {key!r} is longer than "
                f"{limits.max_metadata_value_length} characters", field="metadata")


# C0 controls and DEL: never part of a model id, a URI or a path anyone means to send.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
PLAIN_TEXT_FIELDS = ("base_model", "dataset_uri", "validation_uri")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


def _storable(text: str) -> bool:
    """Whether Postgres can store `text` (no NUL; no lone surrogate, which UTF-8 cannot encode)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(request: dict[str, Any]) -> None:
    """Refuse strings the database cannot store and control characters in names and URIs."""
    for name, value in request.items():
        if name in PLAIN_TEXT_FIELDS and isinstance(value, str) and CONTROL_CHARS.search(value):
            raise InvalidRequest(f"{name} must not contain control characters", field=name)
        if not all(_storable(text) for text in _strings(value)):
            raise InvalidRequest(f"{name} contains a NUL character or invalid Unicode",
                                 field=name)


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value, dictionary keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [*_strings(key), *_strings(item)]]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    return []


def check_idempotency_key(key: str) -> None:
    """An Idempotency-Key is 1 to 255 printable ASCII characters (a UUID is typical)."""
    if not IDEMPOTENCY_KEY_RE.match(key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters "
                             "without spaces", field="Idempotency-Key")


def _is_local_path(base_model: str) -> bool:
    return base_model.startswith(("/", "./", "../", "~", "file:")) or base_model in (".", "..")


def check_base_model(base_model: str, settings: Settings) -> Path | None:
    """The resolved local folder for a local base model, None for an allowed hub id."""
    if _is_local_path(base_model):
        raw = base_model[len("file://"):] if base_model.startswith("file://") else base_model
        try:
            # expanduser raises RuntimeError for "~nobody"; resolve and stat raise OSError for
            # names too long, ValueError for NUL bytes.
            path = Path(unquote(raw)).expanduser().resolve()
            roots = settings.resolved_model_roots
            if not any(path.is_relative_to(root) for root in roots):
                raise ModelRefused(
                    f"base_model {base_model!r} is not under an allowed model root "
                    "(GRALORA_MODEL_ROOTS)", field="base_model")
            is_model_folder = (path / "config.json").is_file()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelRefused(f"base_model {base_model!r} is not a usable path",
                               field="base_model") from exc
        if not is_model_folder:
            raise ModelUnavailable(f"base_model {base_model!r} is not a model folder "
                                   "(no config.json)", field="base_model")
        return path
    if ".." in base_model or not HUB_ID_RE.match(base_model):
        raise ModelRefused(f"base_model {base_model!r} is neither a hub id (org/name) nor an "
                           "absolute path", field="base_model")
    if not any(fnmatch.fnmatchcase(base_model, p) for p in settings.hub_model_allowlist):
        raise ModelRefused(f"base_model {base_model!r} is not in the hub model allowlist",
                           field="base_model")
    return None


def source_options(settings: Settings) -> SourceOptions:
    """Where the service lets datasets come from (the engine's fetch options)."""
    return SourceOptions(
        cache_dir=settings.resolved_cache_dir,
        dataset_roots=settings.resolved_dataset_roots,
        allow_private_urls=settings.allow_private_urls,
        max_bytes=settings.max_dataset_bytes,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_buckets=settings.dataset_s3_buckets,
    )


def check_dataset_uri(uri: str, settings: Settings, *, field: str) -> None:
    """Refuse a dataset URI the worker could not or must not fetch (no download); names `field`.

    Host names are resolved here, so a name that points at an internal address is refused.
    """
    try:
        check_engine_dataset_uri(uri, source_options(settings))
    except GraloraError as error:
        error.field = field
        raise
    except (ValueError, OSError) as exc:  # NUL bytes, over-long names, malformed ports...
        raise DatasetRefused(f"{field} {uri!r} is not a usable URI", field=field) from exc


def build_spec(request: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """The request with every default filled in (k and alpha included), validated."""
    settings = settings or get_settings()
    check_text(request)
    check_limits(request, get_limits())
    spec: dict[str, Any] = {name: request.get(name) for name in ("base_model", "dataset_uri",
                                                                 "rank")}
    for name, default in {**ADAPTER_DEFAULTS, **TRAINING_DEFAULTS}.items():
        value = request.get(name)
        spec[name] = default if value is None else value
    spec["validation_uri"] = request.get("validation_uri")
    spec["exports"] = sorted(set(request.get("exports") or []))
    ExportSpec(kinds=tuple(spec["exports"]))
    adapter = adapter_spec_from(spec)  # validates rank, k, alpha, dropout, targets
    training_spec_from(spec)
    local_model = check_base_model(spec["base_model"], settings)
    check_dataset_uri(spec["dataset_uri"], settings, field="dataset_uri")
    if spec["validation_uri"]:
        check_dataset_uri(spec["validation_uri"], settings, field="validation_uri")

    if local_model is not None:
        try:
            report = preflight(str(local_model), adapter,
                               model_roots=settings.resolved_model_roots)
        except GraloraError as error:
            error.field = error.field or "base_model"
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
            # A config.json that transformers cannot build a model from.
            raise ModelUnavailable(f"base_model {spec['base_model']!r} has a config.json this "
                                   f"service cannot read ({type(exc).__name__})",
                                   field="base_model") from exc
        adapter = report.spec
    elif adapter.k is None:
        adapter = adapter.with_k(choose_k(adapter.rank, []))
    spec["k"] = adapter.k
    spec["alpha"] = adapter.effective_alpha
    spec["target_modules"] = list(adapter.target_modules) if adapter.target_modules else None
    return spec


def adapter_spec_from(spec: dict[str, Any]) -> AdapterSpec:
    """The engine's AdapterSpec from a job spec."""
    return AdapterSpec(
        rank=spec["rank"], k=spec.get("k"), hybrid_rank=spec.get("hybrid_rank", 0),
        alpha=spec.get("alpha"), dropout=spec.get("dropout", 0.05),
        target_modules=tuple(spec["target_modules"]) if spec.get("target_modules") else None,
    )


def training_spec_from(spec: dict[str, Any]) -> TrainingSpec:
    """The engine's TrainingSpec from a job spec."""
    return TrainingSpec(**{name: spec.get(name, default) if spec.get(name) is not None
                           else default for name, default in TRAINING_DEFAULTS.items()})


def _find_idempotent(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def _replay(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new job", field="Idempotency-Key")
    return job


@dataclass
class CreatedJob:
    """The job and whether this call created it (False: an idempotent replay)."""

    job: Job
    created: bool


def create_job(*, session: Session, owner: str, request: dict[str, Any],
               idempotency_key: str | None = None, enqueue: bool = True) -> CreatedJob:
    """Validate, insert as `queued`, commit, then hand the id to the broker.

    A broker failure leaves the job queued; the worker's reaper requeues it later.
    """
    settings = get_settings()
    digest = request_hash(request)
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
        existing = _find_idempotent(session, owner, idempotency_key)
        if existing is not None:
            return CreatedJob(_replay(existing, digest), created=False)

    spec = build_spec(request, settings)
    limits = get_limits()
    _lock_owner(session, owner)
    if idempotency_key is not None:
        # Checked again under the lock: a concurrent twin may have committed meanwhile.
        existing = _find_idempotent(session, owner, idempotency_key)
        if existing is not None:
            return CreatedJob(_replay(existing, digest), created=False)
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status.in_(ACTIVE_STATUSES)))
    if (active or 0) >= limits.max_active_jobs_per_owner:
        raise TooManyActiveJobs(
            f"you already have {active} unfinished jobs (limit "
            f"{limits.max_active_jobs_per_owner}); wait for one to finish or cancel one")

    now = utcnow()
    job = Job(owner=owner, status="queued", spec=spec,
              user_metadata=dict(request.get("metadata") or {}), queue=settings.queue,
              idempotency_key=idempotency_key, request_hash=digest, attempt=0,
              created_at=now, updated_at=now, queued_at=now)
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert.
        if idempotency_key is None:
            raise
        existing = _find_idempotent(session, owner, idempotency_key)
        if existing is None:
            raise
        return CreatedJob(_replay(existing, digest), created=False)
    append_event(session, job_id=job.id, type="status", message="Job queued",
                 data={"status": "queued"})
    session.commit()
    if enqueue:
        _enqueue(job.id, job.queue)
    return CreatedJob(job, created=True)


def _lock_owner(session: Session, owner: str) -> None:
    """Serialize job creation per owner until commit, so the active-job limit holds under races.

    Postgres only; SQLite (embedded mode) already serializes writers.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(owner, 0))))


def _enqueue(job_id: uuid.UUID, queue: str) -> None:
    """Send the job id to the broker; failures are logged, the reaper requeues later."""
    try:
        from service.queue import enqueue_job

        enqueue_job(job_id, queue)
    except Exception:  # noqa: BLE001 - the row is the truth; delivery is retried by the reaper
        log.warning("could not enqueue job %s on %r; it stays queued", job_id, queue,
                    exc_info=True)


def parse_job_id(job_id: str | uuid.UUID) -> uuid.UUID | None:
    """A UUID from user input, or None when it is not one."""
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(job_id)
    except (ValueError, AttributeError, TypeError):
        return None


def get_job(*, session: Session, job_id: uuid.UUID | str, owner: str) -> Job | None:
    """The owner's job with this id, or None (unknown, malformed or someone else's)."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        return None
    return session.scalar(select(Job).where(Job.id == parsed, Job.owner == owner))


def get_owned_job(*, session: Session, job_id: uuid.UUID | str, owner: str,
                  for_update: bool = False) -> Job:
    """The owner's job, or JobNotFound."""
    parsed = parse_job_id(job_id)
    job = None
    if parsed is not None:
        query = select(Job).where(Job.id == parsed, Job.owner == owner)
        if for_update:
            # Lock the row and reload it, even if this session already holds the object.
            query = query.with_for_update().execution_options(populate_existing=True)
        job = session.scalar(query)
    if job is None:
        raise JobNotFound(f"no job {job_id!s}")
    return job


def encode_cursor(job: Job) -> str:
    """An opaque cursor for the position just after `job` in newest-first order."""
    raw = json.dumps({"t": job.created_at.isoformat(), "id": str(job.id)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """(created_at, id) from a cursor; InvalidRequest when it was not made by encode_cursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created_at = datetime.fromisoformat(data["t"])
        if created_at.tzinfo is None:
            raise ValueError("naive cursor time")
        # In UTC now: year 1 at +14:00 would overflow when the database layer converts it.
        return created_at.astimezone(UTC), uuid.UUID(data["id"])
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, binascii.Error,
            RecursionError) as exc:
        raise InvalidRequest("after is not a cursor returned by this API", field="after") from exc


def list_jobs(*, session: Session, owner: str, status: str | None = None, limit: int = 20,
              after: str | None = None) -> tuple[list[Job], bool, str | None]:
    """The owner's jobs newest first: (page, has_more, next cursor)."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    query = select(Job).where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        created_at, last_id = decode_cursor(after)
        # A row comparison, so Postgres seeks the (owner, created_at, id) index to the cursor
        # instead of filtering every newer row (an OR of the two conditions does the latter).
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(
            literal(created_at, Job.created_at.type), literal(last_id, Job.id.type)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    page, has_more = rows[:limit], len(rows) > limit
    return page, has_more, encode_cursor(page[-1]) if has_more else None


def request_cancel(*, session: Session, job_id: uuid.UUID | str, owner: str) -> Job:
    """Cancel a job: queued ones at once, running ones via `cancelling`; finished: conflict."""
    job = get_owned_job(session=session, job_id=job_id, owner=owner, for_update=True)
    if job.status in TERMINAL_STATUSES:
        raise JobNotCancellable(f"job {job.id} already ended with status {job.status!r}")
    if job.status == "cancelling":
        return job
    now = utcnow()
    job.cancel_requested = True
    if job.status in ("queued", "validating_files"):
        job.status = "cancelled"
        job.finished_at = now
        message = "Job cancelled before it started"
    else:
        job.status = "cancelling"
        message = "Cancellation requested; the job stops after the current step"
    job.updated_at = now
    append_event(session, job_id=job.id, type="status", message=message,
                 data={"status": job.status})
    session.commit()
    return job


def list_job_events(*, session: Session, job: Job, after: int | None = None,
                    limit: int = 100) -> tuple[list[JobEvent], bool]:
    """A job's events in order after `after`: (events, has_more)."""
    return list_events(session, job_id=job.id, after=after,
                       limit=max(1, min(limit, MAX_PAGE_SIZE)))


def list_artifacts(*, session: Session, job: Job) -> list[Artifact]:
    """A job's artifacts by name."""
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job.id)
                                .order_by(Artifact.name)))


def get_artifact(*, session: Session, job: Job, name: str) -> Artifact | None:
    """A job's artifact looked up by exact name (never used to build a path)."""
    if not ARTIFACT_NAME_RE.match(name):
        return None  # no stored artifact has such a name (and Postgres refuses NUL bytes)
    return session.scalar(select(Artifact).where(Artifact.job_id == job.id,
                                                 Artifact.name == name))
