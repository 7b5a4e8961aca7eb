"""Jobs: create, list, retrieve, cancel, events."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response

from api.deps import CurrentOwner, OwnedJob, SessionDep
from api.schemas import ErrorResponse, EventList, EventPublic, JobCreate, JobList, JobPublic
from service import jobs as job_service

router = APIRouter(prefix="/jobs", tags=["jobs"], responses={
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key."},
    404: {"model": ErrorResponse, "description": "No such job for this key's owner."},
})

StatusFilter = Literal["validating_files", "queued", "running", "cancelling", "succeeded",
                       "failed", "cancelled"]


@router.post("", status_code=201, response_model=JobPublic, responses={
    200: {"model": JobPublic, "description": "Idempotent replay: the job this Idempotency-Key "
                                             "and body created before."},
    409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    422: {"model": ErrorResponse, "description": "Invalid request (field named)."},
    429: {"model": ErrorResponse, "description": "Too many unfinished jobs."},
})
def create_job(body: JobCreate, session: SessionDep, owner: CurrentOwner, response: Response,
               idempotency_key: Annotated[str | None, Header(
                   alias="Idempotency-Key", min_length=1, max_length=255,
                   description="Retry-safe submission: the same key and body return the "
                               "same job.")] = None) -> JobPublic:
    """Submit a training job; it is queued once its inputs pass the cheap checks."""
    request = body.model_dump(exclude_none=True)
    outcome = job_service.create_job(session=session, owner=owner, request=request,
                                     idempotency_key=idempotency_key)
    if not outcome.created:
        # A replay of an earlier submission: the same job, 200 rather than 201.
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.from_row(outcome.job)


@router.get("", response_model=JobList)
def list_jobs(session: SessionDep, owner: CurrentOwner,
              status: StatusFilter | None = None,
              limit: Annotated[int, Query(ge=1, le=job_service.MAX_PAGE_SIZE)] = 20,
              after: Annotated[str | None, Query(max_length=512,
                                                 description="Cursor from `next`.")] = None,
              ) -> JobList:
    """The caller's jobs, newest first, cursor-paginated."""
    page, has_more, next_cursor = job_service.list_jobs(
        session=session, owner=owner, status=status, limit=limit, after=after)
    return JobList(data=[JobPublic.from_row(job) for job in page], has_more=has_more,
                   next=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job: OwnedJob) -> JobPublic:
    """One job with its spec, progress and error."""
    return JobPublic.from_row(job)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={
    409: {"model": ErrorResponse, "description": "The job already finished."},
})
def cancel_job(job: OwnedJob, session: SessionDep, owner: CurrentOwner) -> JobPublic:
    """Cancel: a queued job at once; a running one stops within seconds (`cancelling`)."""
    return JobPublic.from_row(job_service.request_cancel(session=session, job_id=job.id,
                                                         owner=owner))


@router.get("/{job_id}/events", response_model=EventList)
def list_events(job: OwnedJob, session: SessionDep,
                after: Annotated[int | None, Query(ge=0, le=2**63 - 1,
                                                   description="Last seq seen.")] = None,
                limit: Annotated[int, Query(ge=1, le=job_service.MAX_PAGE_SIZE)] = 100,
                ) -> EventList:
    """Status changes, dataset report, metrics, evals, checkpoints, artifacts, errors."""
    events, has_more = job_service.list_job_events(session=session, job=job, after=after,
                                                   limit=limit)
    return EventList(data=[EventPublic.from_row(e) for e in events], has_more=has_more)
