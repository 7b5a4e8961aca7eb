"""Request and response bodies. Separate Create/Public/List shapes so ORM rows never leak."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.models import Artifact, Job, JobEvent

ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=128,
                                              pattern=r"^[A-Za-z0-9_.\-*]+$")]

JOB_CREATE_EXAMPLE: dict[str, Any] = {
    "base_model": "/srv/models/SmolLM2-135M-Instruct",
    "dataset_uri": "file:///srv/datasets/chat.jsonl",
    "rank": 32,
    "max_steps": 200,
    "batch_size": 8,
    "max_seq_length": 512,
    "exports": ["lora"],
    "metadata": {"team": "search"},
}


class JobCreate(BaseModel):
    """A training job request. Unknown fields are refused; absent fields take the defaults."""

    # strict: "16" is not a rank and true is not 1; a typo must never fall back to a default.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              json_schema_extra={"examples": [JOB_CREATE_EXAMPLE]})

    base_model: str = Field(min_length=1, max_length=512,
                            description="Hub id (org/name) or a folder under a model root.")
    dataset_uri: str = Field(min_length=1, max_length=2048,
                             description="file://, https://, s3:// or hf:// JSONL dataset.")
    rank: int = Field(ge=1, description="GraLoRA rank r (max GRALORA_MAX_RANK, default 1024).")
    k: int | None = Field(None, ge=1, description="Grid size; chosen by the paper's rule "
                          "when absent. Must divide the rank and every targeted layer size.")
    hybrid_rank: int | None = Field(None, ge=0, description="Rank of the plain LoRA branch.")
    alpha: float | None = Field(None, gt=0, le=1e6, description="Scaling; default 2 * rank.")
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[ModuleName] | None = Field(None, min_length=1, max_length=64)
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    learning_rate: float | None = Field(None, gt=0, lt=1)
    batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    max_seq_length: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    validation_uri: str | None = Field(None, min_length=1, max_length=2048)
    exports: list[Literal["merged", "lora"]] | None = Field(None, max_length=2)
    # Sizes are checked against GRALORA_MAX_METADATA_* by the service, so they stay settable.
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 string pairs (keys 1-64, values up to 512 characters), "
                          "echoed on the job.")


JOB_EXAMPLE: dict[str, Any] = {
    "id": "0b6f3c2e-8f2a-4a57-9a55-3c1f7f0e2a11",
    "status": "running",
    "created_at": "2026-12-01T10:00:00Z",
    "started_at": "2026-12-01T10:00:02Z",
    "finished_at": None,
    "spec": {
        **{name: value for name, value in JOB_CREATE_EXAMPLE.items() if name != "metadata"},
        "k": 2, "hybrid_rank": 0, "alpha": 64.0, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"],
        "epochs": 1.0, "learning_rate": 0.0002, "gradient_accumulation_steps": 1, "seed": 42,
        "checkpoint_every_steps": None, "validation_uri": None,
    },
    "progress": {"step": 40, "total_steps": 200, "epoch": 0.4, "loss": 1.73,
                 "learning_rate": 0.00019, "tokens_per_second": 5120.0,
                 "trained_tokens": 163840, "eta_seconds": 96.0},
    "error": None,
    "attempt": 1,
    "metadata": {"team": "search"},
}


class ErrorBody(BaseModel):
    """What went wrong, with a stable code."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error response has this shape."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "invalid_spec", "field": "k",
                   "message": "rank 16 is not divisible by k=3; k must divide the rank "
                              "(for rank 16: 1, 2, 4, 8, 16)"}},
    ]})

    error: ErrorBody


class ProgressPublic(BaseModel):
    """Training progress, updated every few steps."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int | None = None
    eta_seconds: float | None = None


class JobPublic(BaseModel):
    """A job as clients see it."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: uuid.UUID
    status: Literal["validating_files", "queued", "running", "cancelling", "succeeded",
                    "failed", "cancelled"]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    progress: ProgressPublic | None
    error: ErrorBody | None
    attempt: int
    metadata: dict[str, str]

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        """The public view of a job row."""
        progress = None
        if job.progress:
            progress = ProgressPublic(**{name: job.progress.get(name)
                                         for name in ProgressPublic.model_fields})
        error = None
        if job.error:
            error = ErrorBody(code=str(job.error.get("code", "error")),
                              message=str(job.error.get("message", "")),
                              field=job.error.get("field"))
        return cls(id=job.id, status=job.status,  # type: ignore[arg-type]
                   created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at, spec=job.spec, progress=progress, error=error,
                   attempt=job.attempt, metadata=job.user_metadata or {})


class JobList(BaseModel):
    """One page of jobs, newest first."""

    data: list[JobPublic]
    has_more: bool
    next: str | None = Field(description="Pass as `after` to get the next page.")


class EventPublic(BaseModel):
    """One entry of a job's event log."""

    seq: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: JobEvent) -> EventPublic:
        """The public view of an event row."""
        return cls(seq=event.seq, created_at=event.created_at, level=event.level,
                   type=event.type, message=event.message, data=event.data)


class EventList(BaseModel):
    """Events in order; pass the last `seq` as `after` for more."""

    data: list[EventPublic]
    has_more: bool


class ArtifactPublic(BaseModel):
    """A downloadable output of a job."""

    name: str
    kind: str
    size_bytes: int
    sha256: str

    @classmethod
    def from_row(cls, artifact: Artifact) -> ArtifactPublic:
        """The public view of an artifact row."""
        return cls(name=artifact.name, kind=artifact.kind, size_bytes=artifact.size_bytes,
                   sha256=artifact.sha256)


class ArtifactList(BaseModel):
    """A job's artifacts."""

    data: list[ArtifactPublic]
