"""Dependencies: a database session, the caller's owner from the API key, the caller's job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.db import get_sessionmaker
from service.errors import Unauthorized
from service.jobs import get_owned_job
from service.keys import authenticate
from service.models import Job


def get_session() -> Iterator[Session]:
    """One session per request; writes commit inside the service functions."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]

bearer = HTTPBearer(auto_error=False, description="An API key from `gralora create-key`.")


def current_owner(session: SessionDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(bearer)]) -> str:
    """The owner of the presented API key; 401 when missing, unknown or revoked."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    key = authenticate(session, credentials.credentials)
    if key is None:
        raise Unauthorized("the API key is unknown or revoked")
    return key.owner


CurrentOwner = Annotated[str, Depends(current_owner)]


def owned_job(job_id: Annotated[str, Path(description="The job id.")], session: SessionDep,
              owner: CurrentOwner) -> Job:
    """The caller's job; 404 for unknown, malformed or other owners' ids alike."""
    return get_owned_job(session=session, job_id=job_id, owner=owner)


OwnedJob = Annotated[Job, Depends(owned_job)]
