"""Domain errors with a stable code; the API and the worker turn them into user-facing errors."""

from __future__ import annotations

from typing import Any


class GraloraError(Exception):
    """Base error: `code` is snake_case and stable, `message` tells the user what to fix."""

    code = "gralora_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """The `{"code", "message"[, "field"]}` shape used by the API and job records."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class InvalidSpec(GraloraError):
    """The adapter or training spec is inconsistent (bad rank, k, alpha...)."""

    code = "invalid_spec"


class PreflightFailed(GraloraError):
    """The model's layers cannot take the requested adapter (e.g. a size not divisible by k)."""

    code = "preflight_failed"


class InvalidDataset(GraloraError):
    """The dataset file has errors; `details["report"]` holds the full validation report."""

    code = "invalid_dataset"


class DatasetUnavailable(GraloraError):
    """The dataset could not be fetched (missing file, HTTP error, offline hub...)."""

    code = "dataset_unavailable"


class DatasetRefused(GraloraError):
    """The dataset URI is not allowed (scheme, path outside roots, internal address...)."""

    code = "dataset_refused"


class DatasetTooLarge(GraloraError):
    """The dataset exceeds the configured size cap."""

    code = "dataset_too_large"


class ModelUnavailable(GraloraError):
    """The base model could not be found or loaded."""

    code = "model_unavailable"


class UnsafeModel(GraloraError):
    """The base model is refused for safety (pickle-only weights, remote code...)."""

    code = "unsafe_model"


class TrainingCancelled(GraloraError):
    """Training stopped because the caller asked it to."""

    code = "cancelled"
