"""Artifacts: list a job's outputs and download one as a zip."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from api.deps import OwnedJob, SessionDep
from api.schemas import ArtifactList, ArtifactPublic, ErrorResponse
from service import jobs as job_service
from service.errors import ArtifactNotFound, ArtifactStoreUnavailable
from service.storage import InvalidStorageKey, get_artifact_store

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"], responses={
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key."},
    404: {"model": ErrorResponse, "description": "No such job or artifact."},
})


@router.get("", response_model=ArtifactList)
def list_artifacts(job: OwnedJob, session: SessionDep) -> ArtifactList:
    """The job's artifacts: adapter, manifest, and merged / lora when asked for."""
    rows = job_service.list_artifacts(session=session, job=job)
    return ArtifactList(data=[ArtifactPublic.from_row(a) for a in rows])


@router.get("/{name}", response_class=StreamingResponse, responses={
    200: {"content": {"application/zip": {}}, "description": "The artifact as a zip."},
    503: {"model": ErrorResponse, "description": "The artifact store cannot be read."},
})
def download_artifact(job: OwnedJob, session: SessionDep,
                      name: Annotated[str, Path(max_length=64,
                                                description="adapter, merged, lora, manifest")],
                      ) -> StreamingResponse:
    """Download one artifact as a zip (`adapter` unzips to a PEFT adapter folder)."""
    # The name is only ever looked up in the database, never joined into a path.
    artifact = job_service.get_artifact(session=session, job=job, name=name)
    if artifact is None:
        raise ArtifactNotFound(f"job {job.id} has no artifact {name!r}")
    try:
        chunks: Iterator[bytes] = get_artifact_store().iter_bytes(artifact.storage_key)
    except (FileNotFoundError, InvalidStorageKey) as exc:
        raise ArtifactNotFound(f"artifact {name!r} of job {job.id} is no longer stored") from exc
    except Exception as exc:  # a disk, permission or S3 failure: ours, not the caller's
        log.exception("cannot read artifact %s of job %s", artifact.storage_key, job.id)
        raise ArtifactStoreUnavailable("the artifact store cannot be read right now; retry "
                                       "later") from exc
    return StreamingResponse(chunks, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{artifact.name}.zip"',
    })
