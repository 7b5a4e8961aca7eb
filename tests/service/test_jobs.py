"""The job service without HTTP: specs, creation under concurrency, listing, cancelling."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gralora.errors import DatasetRefused, InvalidSpec
from service.db import get_sessionmaker
from service.errors import (
    IdempotencyConflict,
    InvalidRequest,
    JobNotCancellable,
    JobNotFound,
    ModelRefused,
    TooManyActiveJobs,
)
from service.jobs import (
    build_spec,
    create_job,
    decode_cursor,
    encode_cursor,
    get_job,
    list_jobs,
    request_cancel,
    request_hash,
)
from service.models import Job
from tests.fixtures_db import reset_service_caches

HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"


def owner() -> str:
    return f"jobs-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def request_body(dataset_file: Path) -> dict[str, Any]:
    return {"base_model": HUB_MODEL, "dataset_uri": f"file://{dataset_file}", "rank": 16}


@pytest.fixture
def own_queue(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Jobs created in the test go to a queue of their own (no worker takes them)."""
    queue = f"{service_env['GRALORA_QUEUE']}-jobs-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("GRALORA_QUEUE", queue)
    reset_service_caches()
    yield queue
    monkeypatch.undo()
    reset_service_caches()
    client = redis.Redis.from_url(service_env["GRALORA_BROKER_URL"])
    client.delete(queue)
    client.close()


def in_threads(count: int, work: Callable[[Session], Any]) -> list[Any]:
    """Run `work` in `count` threads at once, each with its own session; results or errors."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        session = get_sessionmaker()()
        try:
            barrier.wait()
            results[index] = work(session)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each thread got
            results[index] = exc
        finally:
            session.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


# --- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "k"), [(8, 2), (16, 2), (32, 2), (64, 4), (128, 4), (6, 2)])
def test_hub_model_k_follows_the_papers_rule(request_body: dict[str, Any], rank: int,
                                             k: int) -> None:
    spec = build_spec({**request_body, "rank": rank})
    assert spec["k"] == k and spec["alpha"] == 2.0 * rank


def test_given_k_must_divide_the_rank(request_body: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpec) as info:
        build_spec({**request_body, "rank": 16, "k": 3})
    assert info.value.field == "k"


def test_local_model_k_divides_its_layer_sizes(request_body: dict[str, Any],
                                               model_dir: Path) -> None:
    spec = build_spec({**request_body, "base_model": str(model_dir), "rank": 64})
    # hidden 128, intermediate 256, 2 KV heads of 32: every size is divisible by k.
    assert spec["k"] == 4
    assert set(spec["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("base_model", ["../x", "/etc", "~nobody-here/x", "a/b/c", "org/.."])
def test_base_model_outside_roots_is_refused(request_body: dict[str, Any],
                                             base_model: str) -> None:
    with pytest.raises(ModelRefused):
        build_spec({**request_body, "base_model": base_model})


def test_dataset_uri_errors_name_the_field(request_body: dict[str, Any]) -> None:
    with pytest.raises(DatasetRefused) as info:
        build_spec({**request_body, "validation_uri": "http://10.1.2.3/eval.jsonl"})
    assert info.value.field == "validation_uri"


def test_request_hash_ignores_key_order() -> None:
    assert request_hash({"a": 1, "b": [1, 2]}) == request_hash({"b": [1, 2], "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 2})


# --- create ---------------------------------------------------------------------------------


def test_create_commits_then_sends_the_id_to_redis(db_session: Session, own_queue: str,
                                                   request_body: dict[str, Any],
                                                   service_env: dict[str, str]) -> None:
    outcome = create_job(session=db_session, owner=owner(), request=request_body)

    assert outcome.created and outcome.job.status == "queued" and outcome.job.queue == own_queue
    client = redis.Redis.from_url(service_env["GRALORA_BROKER_URL"])
    try:
        messages = [json.loads(raw) for raw in client.lrange(own_queue, 0, -1)]
    finally:
        client.close()
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "gralora.run_job"
    assert str(outcome.job.id) in messages[0]["headers"]["argsrepr"]


def test_active_job_limit_holds_under_concurrent_submissions(
        own_queue: str, request_body: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRALORA_MAX_ACTIVE_JOBS_PER_OWNER", "3")
    name = owner()

    results = in_threads(10, lambda session: create_job(
        session=session, owner=name, request=request_body, enqueue=False))

    created = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(created) == 3
    assert len(refused) == 7 and all(isinstance(r, TooManyActiveJobs) for r in refused)


def test_concurrent_idempotent_submissions_make_one_job(
        own_queue: str, request_body: dict[str, Any], db_session: Session) -> None:
    name = owner()

    results = in_threads(8, lambda session: create_job(
        session=session, owner=name, request=request_body, idempotency_key="same",
        enqueue=False))

    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r.job.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    count = db_session.scalar(select(func.count()).select_from(Job).where(Job.owner == name))
    assert count == 1


def test_idempotency_key_with_another_body_conflicts(own_queue: str, db_session: Session,
                                                     request_body: dict[str, Any]) -> None:
    name = owner()
    create_job(session=db_session, owner=name, request=request_body, idempotency_key="k",
               enqueue=False)
    with pytest.raises(IdempotencyConflict):
        create_job(session=db_session, owner=name, request={**request_body, "rank": 8},
                   idempotency_key="k", enqueue=False)


@pytest.mark.parametrize("key", ["", "has space", "k" * 256, "tab\tkey", "caf\u00e9"])
def test_malformed_idempotency_keys_are_refused(own_queue: str, db_session: Session,
                                                request_body: dict[str, Any],
                                                key: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        create_job(session=db_session, owner=owner(), request=request_body,
                   idempotency_key=key, enqueue=False)
    assert info.value.field == "Idempotency-Key"


# --- read and cancel ------------------------------------------------------------------------


def add_job(session: Session, name: str, created_at: datetime, status: str = "queued") -> Job:
    job = Job(owner=name, status=status, spec={}, user_metadata={}, created_at=created_at,
              updated_at=created_at)
    session.add(job)
    session.commit()
    return job


def test_cursor_round_trip_and_refusals(db_session: Session) -> None:
    job = add_job(db_session, owner(), datetime(2026, 3, 1, 8, 30, 0, 123456, tzinfo=UTC))

    assert decode_cursor(encode_cursor(job)) == (job.created_at, job.id)
    for bad in ("", "!!!", "e30", encode_cursor(job)[:-3]):
        with pytest.raises(InvalidRequest):
            decode_cursor(bad)


def test_list_pages_do_not_overlap_with_equal_timestamps(db_session: Session) -> None:
    name = owner()
    when = datetime(2026, 3, 1, tzinfo=UTC)
    ids = {add_job(db_session, name, when).id for _ in range(7)}
    add_job(db_session, owner(), when)  # someone else's

    seen: list[uuid.UUID] = []
    after = None
    while True:
        page, has_more, after = list_jobs(session=db_session, owner=name, limit=3, after=after)
        seen += [job.id for job in page]
        if not has_more:
            break
    assert len(seen) == 7 and set(seen) == ids
    assert seen == sorted(seen, reverse=True)


def test_get_job_is_none_for_other_owners_and_bad_ids(db_session: Session) -> None:
    name = owner()
    job = add_job(db_session, name, datetime.now(UTC))

    assert get_job(session=db_session, job_id=str(job.id), owner=name) is not None
    assert get_job(session=db_session, job_id=job.id, owner=owner()) is None
    assert get_job(session=db_session, job_id="nope", owner=name) is None


def test_cancel_transitions(db_session: Session) -> None:
    name = owner()
    now = datetime.now(UTC)
    queued = add_job(db_session, name, now)
    running = add_job(db_session, name, now + timedelta(seconds=1), status="running")
    done = add_job(db_session, name, now + timedelta(seconds=2), status="succeeded")

    assert request_cancel(session=db_session, job_id=queued.id, owner=name).status == "cancelled"
    assert request_cancel(session=db_session, job_id=running.id,
                          owner=name).status == "cancelling"
    with pytest.raises(JobNotCancellable):
        request_cancel(session=db_session, job_id=done.id, owner=name)
    with pytest.raises(JobNotFound):
        request_cancel(session=db_session, job_id=running.id, owner=owner())
