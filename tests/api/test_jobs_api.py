"""The REST contract end to end: real Postgres, real Redis, the app in a TestClient."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from api.app import create_app
from service.db import get_engine
from service.events import append_event
from service.keys import revoke_key
from service.models import ApiKey, Artifact, Job, JobEvent
from service.storage import get_artifact_store
from tests.fixtures_db import reset_service_caches

HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
SPEC_FIELDS = {
    "base_model", "dataset_uri", "rank", "k", "hybrid_rank", "alpha", "dropout",
    "target_modules", "epochs", "max_steps", "learning_rate", "batch_size",
    "gradient_accumulation_steps", "max_seq_length", "seed", "checkpoint_every_steps",
    "validation_uri", "exports",
}
JOB_FIELDS = {"id", "status", "created_at", "started_at", "finished_at", "spec", "progress",
              "error", "attempt", "metadata"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def owner_of(session: Session, key: str) -> str:
    from service.keys import hash_key

    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    assert row is not None
    return row.owner


@pytest.fixture
def key(make_api_key: Callable[..., str]) -> str:
    return make_api_key()


@pytest.fixture
def body(dataset_file: Path) -> dict[str, Any]:
    """The smallest valid request."""
    return {"base_model": HUB_MODEL, "dataset_uri": f"file://{dataset_file}", "rank": 16}


def submit(client: TestClient, key: str, body: dict[str, Any], **headers: str) -> Any:
    response = client.post("/jobs", json=body, headers={**bearer(key), **headers})
    assert response.status_code == 201, response.text
    return response.json()


def insert_job(session: Session, owner: str, *, status: str = "queued",
               created_at: datetime | None = None, **values: Any) -> Job:
    """A job row written straight to the database (committed)."""
    now = created_at or datetime.now(UTC)
    job = Job(owner=owner, status=status, spec={"rank": 16}, user_metadata={}, attempt=0,
              created_at=now, updated_at=now, **values)
    session.add(job)
    session.commit()
    return job


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    if field is not None:
        assert error.get("field") == field, error


# --- create ---------------------------------------------------------------------------------


def test_create_fills_every_default(api_client: TestClient, key: str,
                                    body: dict[str, Any], db_session: Session) -> None:
    job = submit(api_client, key, {**body, "metadata": {"team": "search"}})

    assert set(job) == JOB_FIELDS
    assert job["status"] == "queued"
    assert job["attempt"] == 0 and job["error"] is None and job["progress"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["metadata"] == {"team": "search"}
    spec = job["spec"]
    assert set(spec) == SPEC_FIELDS
    # The paper's k for rank 16 is 2; alpha defaults to 2 * rank.
    assert spec["k"] == 2 and spec["alpha"] == 32.0
    assert spec["hybrid_rank"] == 0 and spec["dropout"] == 0.05
    assert spec["epochs"] == 1.0 and spec["learning_rate"] == 2e-4
    assert spec["batch_size"] == 8 and spec["gradient_accumulation_steps"] == 1
    assert spec["max_seq_length"] == 1024 and spec["seed"] == 42
    assert spec["exports"] == [] and spec["validation_uri"] is None

    row = db_session.get(Job, uuid.UUID(job["id"]))
    assert row is not None and row.status == "queued" and row.spec == spec
    events = db_session.scalars(select(JobEvent).where(JobEvent.job_id == row.id)).all()
    assert [e.data for e in events] == [{"status": "queued"}]


def test_create_echoes_given_k_alpha_and_options(api_client: TestClient, key: str,
                                                 body: dict[str, Any]) -> None:
    given = {**body, "rank": 64, "k": 8, "alpha": 16, "hybrid_rank": 4, "dropout": 0.1,
             "target_modules": ["q_proj", "v_proj"], "epochs": 2, "max_steps": 50,
             "learning_rate": 1e-3, "batch_size": 2, "gradient_accumulation_steps": 4,
             "max_seq_length": 256, "seed": 7, "checkpoint_every_steps": 10,
             "validation_uri": body["dataset_uri"], "exports": ["lora", "merged"]}
    spec = submit(api_client, key, given)["spec"]

    assert spec["k"] == 8 and spec["alpha"] == 16.0
    assert spec["target_modules"] == ["q_proj", "v_proj"]
    assert spec["exports"] == ["lora", "merged"]
    for name in ("rank", "hybrid_rank", "dropout", "epochs", "max_steps", "learning_rate",
                 "batch_size", "gradient_accumulation_steps", "max_seq_length", "seed",
                 "checkpoint_every_steps", "validation_uri"):
        assert spec[name] == given[name], name


def test_create_local_model_resolves_k_and_targets_from_its_config(
        api_client: TestClient, key: str, body: dict[str, Any], model_dir: Path) -> None:
    spec = submit(api_client, key, {**body, "base_model": str(model_dir), "rank": 64})["spec"]

    assert spec["base_model"] == str(model_dir)
    assert spec["k"] == 4 and spec["alpha"] == 128.0
    assert "q_proj" in spec["target_modules"] and "down_proj" in spec["target_modules"]


@pytest.mark.parametrize(("change", "status", "code", "field"), [
    ({"rank": None}, 422, "invalid_request", "rank"),
    ({"rank": "16"}, 422, "invalid_request", "rank"),
    ({"rank": 0}, 422, "invalid_request", "rank"),
    ({"rank": 4096}, 422, "invalid_request", "rank"),
    ({"k": 3}, 422, "invalid_spec", "k"),
    ({"dropout": 1.5}, 422, "invalid_request", "dropout"),
    ({"exports": ["gguf"]}, 422, "invalid_request", "exports.0"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "invalid_request", "metadata"),
    ({"metadata": {"n": 1}}, 422, "invalid_request", "metadata.n"),
    ({"base_model": "../../etc"}, 422, "model_refused", "base_model"),
    ({"base_model": "/etc"}, 422, "model_refused", "base_model"),
    ({"dataset_uri": "ftp://example.com/a.jsonl"}, 422, "dataset_refused", "dataset_uri"),
    ({"dataset_uri": "file:///etc/passwd"}, 422, "dataset_refused", "dataset_uri"),
    ({"validation_uri": "file:///etc/passwd"}, 422, "dataset_refused", "validation_uri"),
])
def test_create_refuses_invalid_requests(api_client: TestClient, key: str,
                                         body: dict[str, Any], change: dict[str, Any],
                                         status: int, code: str, field: str) -> None:
    request = {**body, **change}
    request = {name: value for name, value in request.items() if value is not None}

    response = api_client.post("/jobs", json=request, headers=bearer(key))

    assert_error(response, status, code, field)
    assert api_client.get("/jobs", headers=bearer(key)).json()["data"] == []


def test_metadata_bounds_follow_the_settings(api_client: TestClient, key: str,
                                            body: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    request = {**body, "metadata": {"note": "n" * 800}}
    assert_error(api_client.post("/jobs", json=request, headers=bearer(key)), 422,
                 "invalid_request", "metadata")

    monkeypatch.setenv("GRALORA_MAX_METADATA_VALUE_LENGTH", "1000")
    assert submit(api_client, key, request)["metadata"] == {"note": "n" * 800}


def test_s3_datasets_only_from_allowed_buckets(api_client: TestClient, key: str,
                                               body: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    request = {**body, "dataset_uri": "s3://team-datasets/chat.jsonl"}
    try:
        refused = api_client.post("/jobs", json=request, headers=bearer(key))
        monkeypatch.setenv("GRALORA_DATASET_S3_BUCKETS", "team-datasets")
        reset_service_caches()
        accepted = api_client.post("/jobs", json=request, headers=bearer(key))
        elsewhere = api_client.post(
            "/jobs", json={**request, "dataset_uri": "s3://other-bucket/chat.jsonl"},
            headers=bearer(key))
    finally:
        monkeypatch.undo()
        reset_service_caches()

    assert_error(refused, 422, "dataset_refused", "dataset_uri")
    assert accepted.status_code == 201, accepted.text
    assert_error(elsewhere, 422, "dataset_refused", "dataset_uri")


def test_unknown_field_is_refused_by_name(api_client: TestClient, key: str,
                                          body: dict[str, Any]) -> None:
    # The typo wins over the missing field it was meant to be.
    request = {name: value for name, value in body.items() if name != "rank"}
    response = api_client.post("/jobs", json={**request, "rnak": 16}, headers=bearer(key))

    assert_error(response, 422, "unknown_field", "rnak")
    assert "rnak" in response.json()["error"]["message"]


def test_idempotency_key_replays_same_body_and_refuses_another(
        api_client: TestClient, make_api_key: Callable[..., str], body: dict[str, Any]) -> None:
    key = make_api_key()
    headers = {**bearer(key), "Idempotency-Key": "order-42"}

    first = api_client.post("/jobs", json=body, headers=headers)
    again = api_client.post("/jobs", json=body, headers=headers)
    other = api_client.post("/jobs", json={**body, "rank": 32}, headers=headers)

    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert_error(other, 409, "idempotency_conflict", "Idempotency-Key")
    assert len(api_client.get("/jobs", headers=bearer(key)).json()["data"]) == 1
    # Keys are per owner: someone else's "order-42" is a new job.
    stranger = api_client.post("/jobs", json=body, headers={**bearer(make_api_key()),
                                                            "Idempotency-Key": "order-42"})
    assert stranger.status_code == 201 and stranger.json()["id"] != first.json()["id"]


def test_too_many_active_jobs_is_429_and_frees_up_on_cancel(
        api_client: TestClient, key: str, body: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRALORA_MAX_ACTIVE_JOBS_PER_OWNER", "2")
    first = submit(api_client, key, body, **{"Idempotency-Key": "a"})
    submit(api_client, key, body)

    response = api_client.post("/jobs", json=body, headers=bearer(key))
    assert_error(response, 429, "too_many_active_jobs")
    # A replay of an accepted submission is not a new job, so the limit does not apply.
    replay = api_client.post("/jobs", json=body, headers={**bearer(key), "Idempotency-Key": "a"})
    assert replay.status_code == 200

    assert api_client.post(f"/jobs/{first['id']}/cancel", headers=bearer(key)).status_code == 200
    assert api_client.post("/jobs", json=body, headers=bearer(key)).status_code == 201


def test_body_over_the_limit_is_413(api_client: TestClient, key: str,
                                    body: dict[str, Any]) -> None:
    huge = {**body, "metadata": {"blob": "x" * 200_000}}
    response = api_client.post("/jobs", json=huge, headers=bearer(key))
    assert_error(response, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        yield b'{"base_model": "' + b"a" * 40_000
        yield b"b" * 40_000 + b'"}'

    streamed = api_client.post("/jobs", content=chunks(),
                               headers={**bearer(key), "Content-Type": "application/json"})
    assert_error(streamed, 413, "request_too_large")


# --- read -----------------------------------------------------------------------------------


def test_get_returns_the_job(api_client: TestClient, key: str, body: dict[str, Any]) -> None:
    job = submit(api_client, key, body)

    response = api_client.get(f"/jobs/{job['id']}", headers=bearer(key))

    assert response.status_code == 200 and response.json() == job
    assert_error(api_client.get(f"/jobs/{uuid.uuid4()}", headers=bearer(key)), 404,
                 "job_not_found")


def test_list_is_newest_first_with_a_keyset_cursor(api_client: TestClient, key: str,
                                                   db_session: Session) -> None:
    owner = owner_of(db_session, key)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    # 23 jobs; several share a timestamp, so the id must break ties.
    jobs = [insert_job(db_session, owner, created_at=base + timedelta(seconds=i // 3))
            for i in range(23)]
    expected = [str(j.id) for j in sorted(jobs, key=lambda j: (j.created_at, j.id),
                                          reverse=True)]
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", record)
    try:
        seen: list[str] = []
        page = api_client.get("/jobs", params={"limit": 5}, headers=bearer(key)).json()
        # A job created while paging does not shift later pages (it would with OFFSET).
        insert_job(db_session, owner, created_at=base + timedelta(days=1))
        while True:
            seen += [job["id"] for job in page["data"]]
            if not page["has_more"]:
                assert page["next"] is None
                break
            assert len(page["data"]) == 5
            page = api_client.get("/jobs", params={"limit": 5, "after": page["next"]},
                                  headers=bearer(key)).json()
    finally:
        event.remove(get_engine(), "before_cursor_execute", record)

    assert seen == expected
    assert not any("OFFSET" in s.upper() for s in statements)
    everything = api_client.get("/jobs", params={"limit": 100}, headers=bearer(key)).json()
    assert len(everything["data"]) == 24 and everything["has_more"] is False


def test_list_filters_by_status_and_bounds_limit(api_client: TestClient, key: str,
                                                 db_session: Session) -> None:
    owner = owner_of(db_session, key)
    done = {str(insert_job(db_session, owner, status="succeeded").id) for _ in range(3)}
    insert_job(db_session, owner, status="queued")
    insert_job(db_session, owner, status="failed")

    page = api_client.get("/jobs", params={"status": "succeeded"}, headers=bearer(key)).json()

    assert {job["id"] for job in page["data"]} == done
    assert all(job["status"] == "succeeded" for job in page["data"])
    assert_error(api_client.get("/jobs", params={"status": "done"}, headers=bearer(key)),
                 422, "invalid_request", "status")
    assert_error(api_client.get("/jobs", params={"limit": 101}, headers=bearer(key)),
                 422, "invalid_request", "limit")
    assert_error(api_client.get("/jobs", params={"after": "bm90LWEtY3Vyc29y"},
                                headers=bearer(key)), 422, "invalid_request", "after")


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_queued_job_ends_it_at_once(api_client: TestClient, key: str,
                                           body: dict[str, Any], db_session: Session) -> None:
    job = submit(api_client, key, body)

    response = api_client.post(f"/jobs/{job['id']}/cancel", headers=bearer(key))

    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    row = db_session.get(Job, uuid.UUID(job["id"]))
    assert row is not None and row.status == "cancelled" and row.cancel_requested
    # Cancelled is final: a second cancel is a conflict.
    assert_error(api_client.post(f"/jobs/{job['id']}/cancel", headers=bearer(key)), 409,
                 "job_not_cancellable")


def test_cancel_running_job_asks_the_worker(api_client: TestClient, key: str,
                                            db_session: Session) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status="running",
                     lease_owner="worker-1",
                     lease_expires_at=datetime.now(UTC) + timedelta(minutes=2))

    first = api_client.post(f"/jobs/{job.id}/cancel", headers=bearer(key))
    second = api_client.post(f"/jobs/{job.id}/cancel", headers=bearer(key))

    assert first.status_code == 200 and first.json()["status"] == "cancelling"
    assert first.json()["finished_at"] is None
    assert second.status_code == 200 and second.json()["status"] == "cancelling"
    db_session.expire_all()
    row = db_session.get(Job, job.id)
    assert row is not None and row.cancel_requested and row.lease_owner == "worker-1"


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_finished_job_is_409(api_client: TestClient, key: str, db_session: Session,
                                    status: str) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status=status,
                     finished_at=datetime.now(UTC))

    response = api_client.post(f"/jobs/{job.id}/cancel", headers=bearer(key))

    assert_error(response, 409, "job_not_cancellable")
    db_session.expire_all()
    assert db_session.get(Job, job.id).status == status  # type: ignore[union-attr]


# --- events ---------------------------------------------------------------------------------


def test_events_in_order_after_a_cursor(api_client: TestClient, key: str,
                                        db_session: Session) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status="running")
    for step in range(5):
        append_event(db_session, job_id=job.id, type="metrics", message=f"step {step}",
                     data={"step": step, "loss": 1.0 / (step + 1)})
    db_session.commit()

    everything = api_client.get(f"/jobs/{job.id}/events", headers=bearer(key)).json()
    seqs = [e["seq"] for e in everything["data"]]
    first_two = api_client.get(f"/jobs/{job.id}/events", params={"limit": 2},
                               headers=bearer(key)).json()
    rest = api_client.get(f"/jobs/{job.id}/events", params={"after": seqs[1]},
                          headers=bearer(key)).json()
    none_left = api_client.get(f"/jobs/{job.id}/events", params={"after": seqs[-1]},
                               headers=bearer(key)).json()

    assert seqs == sorted(seqs) and len(seqs) == 5 and everything["has_more"] is False
    assert set(everything["data"][0]) == {"seq", "created_at", "level", "type", "message",
                                          "data"}
    assert [e["data"]["step"] for e in everything["data"]] == [0, 1, 2, 3, 4]
    assert [e["seq"] for e in first_two["data"]] == seqs[:2] and first_two["has_more"] is True
    assert [e["seq"] for e in rest["data"]] == seqs[2:] and rest["has_more"] is False
    assert none_left == {"data": [], "has_more": False}
    assert_error(api_client.get(f"/jobs/{job.id}/events", params={"after": -1},
                                headers=bearer(key)), 422, "invalid_request", "after")


# --- artifacts ------------------------------------------------------------------------------


def store_artifact(session: Session, job: Job, name: str, payload: bytes,
                   tmp_path: Path) -> Artifact:
    """Zip `payload` into the artifact store and record it, as the worker does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_model.safetensors", payload)
    data = buffer.getvalue()
    local = tmp_path / f"{name}.zip"
    local.write_bytes(data)
    storage_key = f"{job.id}/{name}.zip"
    get_artifact_store().put_file(local, storage_key)
    artifact = Artifact(job_id=job.id, name=name, kind="directory", size_bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), storage_key=storage_key)
    session.add(artifact)
    session.commit()
    return artifact


def test_artifacts_list_and_download(api_client: TestClient, key: str, db_session: Session,
                                     tmp_path: Path) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status="succeeded")
    payload = os.urandom(3 << 20)  # several chunks of the store's 1 MiB reads
    adapter = store_artifact(db_session, job, "adapter", payload, tmp_path)
    store_artifact(db_session, job, "manifest", b"{}", tmp_path)

    listing = api_client.get(f"/jobs/{job.id}/artifacts", headers=bearer(key))
    download = api_client.get(f"/jobs/{job.id}/artifacts/adapter", headers=bearer(key))

    assert listing.status_code == 200
    assert listing.json() == {"data": [
        {"name": "adapter", "kind": "directory", "size_bytes": adapter.size_bytes,
         "sha256": adapter.sha256},
        {"name": "manifest", "kind": "directory", "size_bytes": listing.json()["data"][1][
            "size_bytes"], "sha256": listing.json()["data"][1]["sha256"]},
    ]}
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    assert 'filename="adapter.zip"' in download.headers["content-disposition"]
    assert hashlib.sha256(download.content).hexdigest() == adapter.sha256
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert archive.read("adapter_model.safetensors") == payload


def test_missing_artifacts_are_404(api_client: TestClient, key: str, db_session: Session,
                                   tmp_path: Path) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status="succeeded")
    gone = store_artifact(db_session, job, "merged", b"weights", tmp_path)
    (Path(os.environ["GRALORA_ARTIFACTS_DIR"]) / gone.storage_key).unlink()

    assert api_client.get(f"/jobs/{job.id}/artifacts", headers=bearer(key)).json()["data"]
    assert_error(api_client.get(f"/jobs/{job.id}/artifacts/lora", headers=bearer(key)), 404,
                 "artifact_not_found")
    assert_error(api_client.get(f"/jobs/{job.id}/artifacts/merged", headers=bearer(key)), 404,
                 "artifact_not_found")


def raw_get(client: TestClient, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET `path` exactly as given (HTTP clients would remove "..": servers receive it as is).

    Like uvicorn, the app gets the percent-decoded path and the raw bytes beside it.
    """
    messages: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": unquote(path), "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "server": ("testserver", 80), "client": ("127.0.0.1", 1234),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in messages
                            if m["type"] == "http.response.body")


def test_unreachable_artifact_store_is_503(api_client: TestClient, key: str,
                                           db_session: Session, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status="succeeded")
    store_artifact(db_session, job, "adapter", b"weights", tmp_path)
    for name, value in {"GRALORA_ARTIFACTS_S3_BUCKET": "artifacts",
                        "GRALORA_S3_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
                        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    reset_service_caches()
    try:
        response = api_client.get(f"/jobs/{job.id}/artifacts/adapter", headers=bearer(key))
    finally:
        monkeypatch.undo()
        reset_service_caches()

    assert_error(response, 503, "artifact_store_unavailable")


@pytest.mark.parametrize("name", [
    "..", "../adapter", "..%2Fadapter", "%2e%2e%2fadapter", "%2E%2E", "..%5Cadapter",
    "%252e%252e%252fadapter", "adapter%2F..%2F..%2Fsecret", "adapter%00", "adapter.zip",
    "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "../../../../etc/passwd", "./adapter",
    "%2Fetc%2Fpasswd", "ADAPTER", "adapter%20", "..%2Fsecret",
])
def test_artifact_names_never_reach_the_filesystem(api_client: TestClient, key: str,
                                                   db_session: Session, tmp_path: Path,
                                                   name: str) -> None:
    job = insert_job(db_session, owner_of(db_session, key), status="succeeded")
    store_artifact(db_session, job, "adapter", b"weights", tmp_path)
    # A file beside the artifact folder that a traversal would reach.
    (Path(os.environ["GRALORA_ARTIFACTS_DIR"]) / "secret").write_text("TOP-SECRET")

    status, content = raw_get(api_client, f"/jobs/{job.id}/artifacts/{name}", bearer(key))

    assert status == 404, content
    assert json.loads(content)["error"]["code"] in ("artifact_not_found", "not_found")
    assert b"TOP-SECRET" not in content and not content.startswith(b"PK")


# --- authorization --------------------------------------------------------------------------


def test_another_owners_job_is_404_for_every_verb(api_client: TestClient,
                                                  make_api_key: Callable[..., str],
                                                  db_session: Session, tmp_path: Path) -> None:
    alice, mallory = make_api_key(), make_api_key()
    job = insert_job(db_session, owner_of(db_session, alice), status="queued")
    append_event(db_session, job_id=job.id, type="status", message="queued")
    db_session.commit()
    store_artifact(db_session, job, "adapter", b"weights", tmp_path)

    for method, path in [("GET", f"/jobs/{job.id}"), ("GET", f"/jobs/{job.id}/events"),
                         ("GET", f"/jobs/{job.id}/artifacts"),
                         ("GET", f"/jobs/{job.id}/artifacts/adapter"),
                         ("POST", f"/jobs/{job.id}/cancel")]:
        response = api_client.request(method, path, headers=bearer(mallory))
        assert_error(response, 404, "job_not_found")
        assert str(job.id) in response.json()["error"]["message"]
        assert api_client.request(method, path, headers=bearer(alice)).status_code == 200

    assert api_client.get("/jobs", headers=bearer(mallory)).json()["data"] == []
    db_session.expire_all()
    row = db_session.get(Job, job.id)
    assert row is not None and row.status == "cancelled"  # only alice's cancel counted


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer glr_nope"},
    {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "glr_nope"},
])
def test_missing_or_wrong_key_is_401(api_client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{uuid.uuid4()}"),
                         ("POST", f"/jobs/{uuid.uuid4()}/cancel")]:
        response = api_client.request(method, path, headers=headers,
                                      json={} if method == "POST" else None)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("content", [b'{"rank": 16', b'{"base_model": "\xff"}',
                                     b"[" * 30_000])
def test_key_is_checked_before_the_body_is_judged(api_client: TestClient, key: str,
                                                  content: bytes) -> None:
    json_header = {"Content-Type": "application/json"}

    anonymous = api_client.post("/jobs", content=content, headers=json_header)
    wrong_key = api_client.post("/jobs", content=content,
                                headers={**json_header, **bearer("glr_wrong")})
    right_key = api_client.post("/jobs", content=content, headers={**json_header, **bearer(key)})

    assert_error(anonymous, 401, "unauthorized")
    assert_error(wrong_key, 401, "unauthorized")
    assert_error(right_key, 400, "invalid_json")


def test_revoked_key_is_401_at_once(api_client: TestClient, key: str, body: dict[str, Any],
                                    db_session: Session) -> None:
    job = submit(api_client, key, body)
    revoke_key(db_session, prefix=key[:12])
    db_session.commit()

    for method, path in [("GET", "/jobs"), ("GET", f"/jobs/{job['id']}"),
                         ("POST", f"/jobs/{job['id']}/cancel")]:
        assert_error(api_client.request(method, path, headers=bearer(key)), 401,
                     "unauthorized")
    assert_error(api_client.post("/jobs", json=body, headers=bearer(key)), 401, "unauthorized")
    # The stored key is a hash: the plaintext appears nowhere in the table.
    assert db_session.scalar(select(ApiKey).where(ApiKey.key_hash == key)) is None


# --- health, metrics, docs ------------------------------------------------------------------


def test_health_ready_metrics_and_docs_need_no_key(api_client: TestClient, key: str,
                                                   body: dict[str, Any]) -> None:
    submit(api_client, key, body)

    assert api_client.get("/healthz").json() == {"status": "ok"}
    ready = api_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    metrics = api_client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/")
    queued = [line for line in metrics.text.splitlines()
              if line.startswith('gralora_jobs{status="queued"}')]
    assert queued and float(queued[0].split()[-1]) >= 1
    assert "gralora_queue_depth" in metrics.text
    assert "gralora_job_duration_seconds_bucket" in metrics.text
    docs = api_client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = api_client.get("/openapi.json").json()
    create = schema["paths"]["/jobs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]
    for name in ("JobCreate", "JobPublic", "ErrorResponse"):
        assert schema["components"]["schemas"][name]["examples"], name
    assert set(create["responses"]) >= {"201", "401", "409", "413", "422", "429"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch,
                service_env: dict[str, str]) -> Iterator[Callable[[str], TestClient]]:
    """`unreachable("database"|"broker")`: an app whose database or broker is a closed port."""
    def make(which: str) -> TestClient:
        port = _closed_port()
        if which == "database":
            monkeypatch.setenv("GRALORA_DATABASE_URL",
                               f"postgresql+psycopg://postgres@127.0.0.1:{port}/gone")
        else:
            monkeypatch.setenv("GRALORA_BROKER_URL", f"redis://127.0.0.1:{port}/0")
        reset_service_caches()
        return TestClient(create_app(), raise_server_exceptions=False)

    try:
        yield make
    finally:
        monkeypatch.undo()
        reset_service_caches()


def test_database_down_is_503_with_a_code(unreachable: Callable[[str], TestClient],
                                          key: str, body: dict[str, Any]) -> None:
    client = unreachable("database")

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "not_ready"
    assert ready.json()["checks"] == {"database": "unreachable", "broker": "ok"}
    for method, path in [("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{uuid.uuid4()}"),
                         ("GET", "/metrics")]:
        response = client.request(method, path, headers=bearer(key),
                                  json=body if method == "POST" else None)
        assert_error(response, 503, "database_unavailable")
        assert response.headers["Retry-After"]
    broken = client.post("/jobs", content=b"{", headers={**bearer(key),
                                                         "Content-Type": "application/json"})
    assert_error(broken, 503, "database_unavailable")
    assert client.get("/healthz").status_code == 200


def test_broker_down_fails_readiness_but_jobs_are_still_accepted(
        unreachable: Callable[[str], TestClient], key: str, body: dict[str, Any],
        db_session: Session) -> None:
    client = unreachable("broker")

    ready = client.get("/readyz")
    started = time.monotonic()
    response = client.post("/jobs", json=body, headers=bearer(key))
    elapsed = time.monotonic() - started

    assert ready.status_code == 503
    assert elapsed < 3.0  # no retrying an unreachable broker while the client waits
    assert ready.json()["checks"] == {"database": "ok", "broker": "unreachable"}
    # The row is the truth: the job waits queued and the reaper re-sends it later.
    assert response.status_code == 201 and response.json()["status"] == "queued"
    row = db_session.get(Job, uuid.UUID(response.json()["id"]))
    assert row is not None and row.status == "queued"
