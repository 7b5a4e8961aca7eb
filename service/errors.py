"""Service-level domain errors: each has a stable code and the HTTP status the API answers with."""

from __future__ import annotations

from gralora.errors import GraloraError


class ServiceError(GraloraError):
    """Base of service errors; `http_status` is what the API answers."""

    code = "service_error"
    http_status = 400


class InvalidRequest(ServiceError):
    """A request field is out of bounds or inconsistent."""

    code = "invalid_request"
    http_status = 422


class ModelRefused(ServiceError):
    """The base model is not allowed (hub id outside the allowlist, path outside model roots)."""

    code = "model_refused"
    http_status = 422


class Unauthorized(ServiceError):
    """Missing, unknown or revoked API key."""

    code = "unauthorized"
    http_status = 401


class JobNotFound(ServiceError):
    """No job with this id belongs to the caller."""

    code = "job_not_found"
    http_status = 404


class ArtifactNotFound(ServiceError):
    """The job has no artifact with this name."""

    code = "artifact_not_found"
    http_status = 404


class KeyNotFound(ServiceError):
    """No API key matches the given id or prefix."""

    code = "key_not_found"
    http_status = 404


class JobNotCancellable(ServiceError):
    """The job already finished; there is nothing to cancel."""

    code = "job_not_cancellable"
    http_status = 409


class IdempotencyConflict(ServiceError):
    """The Idempotency-Key was already used with a different request body."""

    code = "idempotency_conflict"
    http_status = 409


class TooManyActiveJobs(ServiceError):
    """The owner already has the maximum number of unfinished jobs."""

    code = "too_many_active_jobs"
    http_status = 429


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached."""

    code = "database_unavailable"
    http_status = 503


class ArtifactStoreUnavailable(ServiceError):
    """The artifact store (folder or bucket) cannot be read right now."""

    code = "artifact_store_unavailable"
    http_status = 503


# Engine errors raised while checking a request are the caller's to fix: 422.
ENGINE_ERROR_STATUS = 422


def http_status_for(error: GraloraError) -> int:
    """The HTTP status for a domain error (service errors carry theirs; engine errors are 422)."""
    return getattr(error, "http_status", ENGINE_ERROR_STATUS)
