"""Health: liveness and readiness (database and broker reachable)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.db import get_engine
from service.settings import get_settings

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 2.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


def check_database() -> str | None:
    """None when `SELECT 1` works, else why not."""
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"{type(exc).__name__}"
    return None


def check_broker() -> str | None:
    """None when the broker accepts a connection within a short timeout, else why not."""
    from kombu import Connection

    try:
        with Connection(get_settings().resolved_broker_url,
                        connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                         timeout=BROKER_TIMEOUT_SECONDS)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"{type(exc).__name__}"
    return None


@router.get("/readyz", responses={503: {"description": "Database or broker unreachable."}})
def readyz() -> JSONResponse:
    """Ready when the database and the broker are reachable; else 503."""
    problems = {"database": check_database(), "broker": check_broker()}
    checks = {name: "ok" if problem is None else "unreachable"
              for name, problem in problems.items()}
    failing = [name for name, problem in problems.items() if problem is not None]
    if not failing:
        return JSONResponse({"status": "ready", "checks": checks})
    body: dict[str, Any] = {
        "error": {"code": "not_ready", "message": f"unreachable: {', '.join(failing)}"},
        "checks": checks,
    }
    return JSONResponse(body, status_code=503)
