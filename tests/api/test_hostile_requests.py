"""Malformed and hostile requests: each gets a 4xx in the one error shape, never a 5xx.

No case needs the internet: internal addresses are IP literals or `localhost` (from
/etc/hosts), and URLs with credentials are refused before any name is resolved.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.keys import hash_key
from service.models import ApiKey, Job

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9_]*$")
UNSET: Any = object()


@dataclass(frozen=True)
class Hostile:
    """One request. Placeholders in paths and strings: {job} (the caller's own job), {other}
    (another owner's job), {dataset} (a valid dataset file), {datasets} and {models} (roots)."""

    name: str
    method: str = "POST"
    path: str = "/jobs"
    changes: dict[str, Any] | None = None  # applied to a valid job request (None: removes)
    body: Any = UNSET  # a whole JSON body instead of `changes`
    content: bytes | None = None  # raw bytes instead of JSON
    headers: dict[str, str | bytes] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    auth: bool = True
    status: int | None = None  # the exact status expected, when one is
    code: str | None = None  # the exact error code expected, when one is
    field: str | None = None  # the field the error must name, when one is


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _ssrf(name: str, uri: str, code: str = "dataset_refused",
          field: str = "dataset_uri") -> Hostile:
    return Hostile(f"ssrf-{name}", changes={field: uri}, status=422, code=code, field=field)


def _typed(name: str, changes: dict[str, Any], field: str, code: str = "invalid_request",
           ) -> Hostile:
    return Hostile(name, changes=changes, status=422, code=code, field=field)


CASES: list[Hostile] = [
    # Wrong types and out-of-range values, field by field.
    _typed("rank-string", {"rank": "16"}, "rank"),
    _typed("rank-float", {"rank": 16.5}, "rank"),
    _typed("rank-whole-float", {"rank": 16.0}, "rank"),
    _typed("rank-bool", {"rank": True}, "rank"),
    _typed("rank-null", {"rank": None}, "rank"),
    _typed("rank-list", {"rank": [16]}, "rank"),
    _typed("rank-object", {"rank": {"value": 16}}, "rank"),
    _typed("rank-negative", {"rank": -16}, "rank"),
    _typed("rank-huge", {"rank": 10**30}, "rank"),
    _typed("k-string", {"k": "2"}, "k"),
    _typed("k-zero", {"k": 0}, "k"),
    _typed("k-not-dividing-rank", {"k": 32}, "k", code="invalid_spec"),
    _typed("k-over-limit", {"rank": 512, "k": 128}, "k"),
    _typed("hybrid-rank-negative", {"hybrid_rank": -1}, "hybrid_rank"),
    _typed("alpha-string", {"alpha": "big"}, "alpha"),
    _typed("alpha-zero", {"alpha": 0}, "alpha"),
    _typed("alpha-overflow", {"alpha": 1e300}, "alpha"),
    _typed("dropout-string", {"dropout": "0.1"}, "dropout"),
    _typed("dropout-one", {"dropout": 1}, "dropout"),
    _typed("target-modules-string", {"target_modules": "q_proj"}, "target_modules"),
    _typed("target-modules-int", {"target_modules": [1]}, "target_modules.0"),
    _typed("target-modules-empty", {"target_modules": []}, "target_modules"),
    _typed("target-modules-space", {"target_modules": ["q proj"]}, "target_modules.0"),
    _typed("target-modules-path", {"target_modules": ["../../x"]}, "target_modules.0"),
    _typed("target-modules-too-many", {"target_modules": [f"m{i}" for i in range(65)]},
           "target_modules"),
    _typed("epochs-zero", {"epochs": 0}, "epochs"),
    _typed("epochs-negative", {"epochs": -1}, "epochs"),
    _typed("epochs-huge", {"epochs": 1e9}, "epochs"),
    _typed("max-steps-zero", {"max_steps": 0}, "max_steps"),
    _typed("max-steps-huge", {"max_steps": 10**12}, "max_steps"),
    _typed("learning-rate-one-and-a-half", {"learning_rate": 1.5}, "learning_rate"),
    _typed("learning-rate-string", {"learning_rate": "fast"}, "learning_rate"),
    _typed("batch-size-zero", {"batch_size": 0}, "batch_size"),
    _typed("batch-size-huge", {"batch_size": 10**6}, "batch_size"),
    _typed("accumulation-negative", {"gradient_accumulation_steps": -3},
           "gradient_accumulation_steps"),
    _typed("max-seq-length-huge", {"max_seq_length": 10**9}, "max_seq_length"),
    _typed("seed-negative", {"seed": -1}, "seed"),
    _typed("seed-huge", {"seed": 2**40}, "seed"),
    _typed("checkpoint-every-zero", {"checkpoint_every_steps": 0}, "checkpoint_every_steps"),
    _typed("validation-uri-empty", {"validation_uri": ""}, "validation_uri"),
    _typed("exports-string", {"exports": "lora"}, "exports"),
    _typed("exports-unknown", {"exports": ["pickle"]}, "exports.0"),
    _typed("exports-too-many", {"exports": ["lora", "merged", "lora"]}, "exports"),
    _typed("metadata-list", {"metadata": ["a", "b"]}, "metadata"),
    _typed("metadata-nested", {"metadata": {"a": {"b": "c"}}}, "metadata.a"),
    _typed("metadata-number", {"metadata": {"a": 1}}, "metadata.a"),
    _typed("metadata-17-pairs", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    _typed("metadata-1000-pairs", {"metadata": {f"k{i}": "v" for i in range(1000)}},
           "metadata"),
    _typed("metadata-long-value", {"metadata": {"a": "v" * 513}}, "metadata"),
    _typed("metadata-long-key", {"metadata": {"k" * 65: "v"}}, "metadata"),
    _typed("metadata-empty-key", {"metadata": {"": "v"}}, "metadata"),
    # Missing fields and bodies that are not a job request.
    _typed("missing-rank", {"rank": None}, "rank"),
    _typed("missing-base-model", {"base_model": None}, "base_model"),
    _typed("missing-dataset", {"dataset_uri": None}, "dataset_uri"),
    Hostile("empty-object", body={}, status=422, code="invalid_request"),
    Hostile("array-body", body=[1, 2], status=422, code="invalid_request"),
    Hostile("string-body", body="rank=16", status=422, code="invalid_request"),
    Hostile("number-body", body=42, status=422, code="invalid_request"),
    Hostile("null-body", content=b"null", headers={"Content-Type": "application/json"},
            status=422, code="invalid_request"),
    Hostile("empty-body", content=b"", headers={"Content-Type": "application/json"},
            status=422, code="invalid_request"),
    Hostile("unknown-field", changes={"learning_rate_typo": 1}, status=422,
            code="unknown_field", field="learning_rate_typo"),
    Hostile("unknown-nested-id", changes={"id": str(uuid.uuid4()), "status": "succeeded"},
            status=422, code="unknown_field"),
    Hostile("owner-smuggling", changes={"owner": "someone-else"}, status=422,
            code="unknown_field", field="owner"),
    # Broken JSON.
    Hostile("json-truncated", content=b'{"rank": 16', headers={"Content-Type":
                                                                "application/json"},
            status=400, code="invalid_json"),
    Hostile("json-single-quotes", content=b"{'rank': 16}",
            headers={"Content-Type": "application/json"}, status=400, code="invalid_json"),
    Hostile("json-trailing-comma", content=b'{"rank": 16,}',
            headers={"Content-Type": "application/json"}, status=400, code="invalid_json"),
    Hostile("json-nan", content=b'{"base_model": "a/b", "dataset_uri": "x", "rank": 16, '
                                b'"learning_rate": NaN}',
            headers={"Content-Type": "application/json"}, status=422, code="invalid_request",
            field="learning_rate"),
    Hostile("json-infinity-rank", content=b'{"base_model": "a/b", "dataset_uri": "x", '
                                          b'"rank": Infinity}',
            headers={"Content-Type": "application/json"}, status=422, field="rank"),
    Hostile("json-deep-nesting", content=b"[" * 30_000 + b"]" * 30_000,
            headers={"Content-Type": "application/json"}, status=400, code="invalid_json"),
    Hostile("json-5000-digit-number",
            content=b'{"base_model": "a/b", "dataset_uri": "x", "rank": ' + b"9" * 5000 + b"}",
            headers={"Content-Type": "application/json"}, status=400, code="invalid_json"),
    Hostile("json-invalid-utf8", content=b'{"base_model": "\xff\xfe"}',
            headers={"Content-Type": "application/json"}, status=400, code="invalid_json"),
    Hostile("json-duplicate-keys", content=b'{"base_model": "a/b", "dataset_uri": "x", '
                                           b'"rank": 16, "rank": "16"}',
            headers={"Content-Type": "application/json"}, status=422, field="rank"),
    Hostile("text-plain", content=b'{"rank": 16}', headers={"Content-Type": "text/plain"},
            status=415, code="unsupported_media_type"),
    Hostile("form-encoded", content=b"rank=16&base_model=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            status=415, code="unsupported_media_type"),
    Hostile("no-content-type", content=b'{"rank": 16}', status=415,
            code="unsupported_media_type"),
    Hostile("multipart", content=b"--b\r\n\r\n--b--", headers={
        "Content-Type": "multipart/form-data; boundary=b"}, status=415),
    # Huge bodies and strings.
    Hostile("body-1mb", changes={"metadata": {"a": "x" * (1 << 20)}}, status=413,
            code="request_too_large"),
    Hostile("body-declared-huge", content=b"{}", headers={
        "Content-Type": "application/json", "Content-Length": str(10**12)},
        status=413, code="request_too_large"),
    _typed("base-model-600-chars", {"base_model": "a" * 600}, "base_model"),
    _typed("dataset-uri-5000-chars", {"dataset_uri": "file:///" + "a" * 5000}, "dataset_uri"),
    # Unicode and bytes Postgres cannot store.
    _typed("base-model-cjk", {"base_model": "模型/名前"}, "base_model", code="model_refused"),
    _typed("base-model-rtl-override", {"base_model": "org/model\u202egnp."}, "base_model",
           code="model_refused"),
    _typed("base-model-zero-width", {"base_model": "org/mo\u200bdel"}, "base_model",
           code="model_refused"),
    _typed("base-model-nul", {"base_model": "org/a\u0000b"}, "base_model"),
    _typed("base-model-newline", {"base_model": "org/model\nX-Injected: 1"}, "base_model"),
    _typed("dataset-uri-nul", {"dataset_uri": "file://{dataset}\u0000.txt"}, "dataset_uri"),
    _typed("dataset-uri-tab", {"dataset_uri": "http://127.0.0.1\t.example.com/x"},
           "dataset_uri"),
    _typed("metadata-nul-value", {"metadata": {"a": "x\u0000y"}}, "metadata"),
    _typed("metadata-nul-key", {"metadata": {"a\u0000": "y"}}, "metadata"),
    Hostile("metadata-lone-surrogate",
            content=b'{"base_model": "a/b", "dataset_uri": "file://{dataset}", "rank": 16, '
                    b'"metadata": {"a": "\\ud800"}}',
            headers={"Content-Type": "application/json"}, status=422, field="metadata"),
    Hostile("base-model-lone-surrogate",
            content=b'{"base_model": "a/\\udfff", "dataset_uri": "file://{dataset}", '
                    b'"rank": 16}',
            headers={"Content-Type": "application/json"}, status=422, field="base_model"),
    # SSRF: every spelling of an internal address, and schemes that are not datasets.
    _ssrf("loopback", "http://127.0.0.1/data.jsonl"),
    _ssrf("loopback-https-port", "https://127.0.0.1:8443/data.jsonl"),
    _ssrf("decimal", "http://2130706433/data.jsonl"),
    _ssrf("hex", "http://0x7f000001/data.jsonl"),
    _ssrf("octal", "http://0177.0.0.1/data.jsonl"),
    _ssrf("short-form", "http://127.1/data.jsonl"),
    _ssrf("zero", "http://0/data.jsonl"),
    _ssrf("unspecified", "http://0.0.0.0/data.jsonl"),
    _ssrf("ipv6-loopback", "http://[::1]/data.jsonl"),
    _ssrf("ipv6-unspecified", "http://[::]/data.jsonl"),
    _ssrf("ipv4-mapped", "http://[::ffff:127.0.0.1]/data.jsonl"),
    _ssrf("ipv4-mapped-hex", "http://[::ffff:7f00:1]/data.jsonl"),
    _ssrf("ipv4-mapped-long", "http://[0:0:0:0:0:ffff:7f00:1]/data.jsonl"),
    _ssrf("metadata-aws", "http://169.254.169.254/latest/meta-data/"),
    _ssrf("metadata-aws-ipv6", "http://[fd00:ec2::254]/latest/meta-data/"),
    _ssrf("metadata-alibaba", "http://100.100.100.200/latest/meta-data/"),
    _ssrf("localhost", "http://localhost/data.jsonl"),
    _ssrf("localhost-upper-port", "http://LOCALHOST:6379/data.jsonl"),
    _ssrf("private-10", "http://10.0.0.5/data.jsonl"),
    _ssrf("private-192", "http://192.168.1.1/data.jsonl"),
    _ssrf("private-172", "http://172.16.0.1/data.jsonl"),
    _ssrf("bad-octet", "http://1.2.3.999/data.jsonl"),
    _ssrf("credentials", "http://user:secret@example.com/data.jsonl"),
    _ssrf("validation-uri", "http://127.0.0.1/eval.jsonl", field="validation_uri"),
    _ssrf("gopher", "gopher://127.0.0.1:6379/_INFO"),
    _ssrf("ftp", "ftp://127.0.0.1/data.jsonl"),
    _ssrf("dict", "dict://127.0.0.1:6379/INFO"),
    _ssrf("data-uri", "data:text/plain,hello"),
    _ssrf("jar", "jar:http://127.0.0.1/a.jar!/data.jsonl"),
    _ssrf("scheme-relative", "//127.0.0.1/data.jsonl"),
    _ssrf("s3-ip-bucket", "s3://169.254.169.254/latest"),
    _ssrf("hf-traversal", "hf://datasets/../../etc/passwd"),
    # Local files outside the dataset roots.
    _ssrf("etc-passwd", "file:///etc/passwd"),
    _ssrf("etc-passwd-localhost", "file://localhost/etc/passwd"),
    _ssrf("file-remote-host", "file://127.0.0.1/etc/passwd"),
    _ssrf("proc-environ", "file:///proc/self/environ"),
    _ssrf("dev-zero", "file:///dev/zero"),
    _ssrf("plain-path", "/etc/passwd"),
    _ssrf("root-dotdot", "file://{datasets}/../../../etc/passwd"),
    _ssrf("root-encoded-dotdot", "file://{datasets}/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
    _ssrf("root-itself", "file://{datasets}"),
    _ssrf("missing-file", "file://{datasets}/nope.jsonl", code="dataset_unavailable"),
    # Base models outside the model roots.
    _typed("model-dotdot", {"base_model": "../../etc"}, "base_model", code="model_refused"),
    _typed("model-absolute", {"base_model": "/etc"}, "base_model", code="model_refused"),
    _typed("model-root-escape", {"base_model": "{models}/../../etc"}, "base_model",
           code="model_refused"),
    _typed("model-tilde", {"base_model": "~root"}, "base_model", code="model_refused"),
    _typed("model-tilde-unknown-user", {"base_model": "~no-such-user-42/x"}, "base_model",
           code="model_refused"),
    _typed("model-file-uri", {"base_model": "file:///etc"}, "base_model",
           code="model_refused"),
    _typed("model-hub-dotdot", {"base_model": "org/../name"}, "base_model",
           code="model_refused"),
    _typed("model-three-parts", {"base_model": "a/b/c"}, "base_model", code="model_refused"),
    _typed("model-option-like", {"base_model": "-rf"}, "base_model", code="model_refused"),
    _typed("model-root-itself", {"base_model": "{models}"}, "base_model",
           code="model_unavailable"),
    _typed("model-name-too-long", {"base_model": "{models}/" + "a" * 300}, "base_model",
           code="model_refused"),
    # Paths and query strings.
    Hostile("job-id-not-uuid", "GET", "/jobs/not-a-uuid", status=404, code="job_not_found"),
    Hostile("job-id-nul", "GET", "/jobs/%00", status=404),
    Hostile("job-id-sql", "GET", "/jobs/' OR 1=1 --", status=404, code="job_not_found"),
    Hostile("job-id-long", "GET", "/jobs/" + "f" * 10_000, status=404, code="job_not_found"),
    Hostile("job-id-urn-of-other", "GET", "/jobs/urn:uuid:{other}", status=404,
            code="job_not_found"),
    Hostile("other-get", "GET", "/jobs/{other}", status=404, code="job_not_found"),
    Hostile("other-cancel", "POST", "/jobs/{other}/cancel", status=404, code="job_not_found"),
    Hostile("other-events", "GET", "/jobs/{other}/events", status=404, code="job_not_found"),
    Hostile("other-artifacts", "GET", "/jobs/{other}/artifacts", status=404,
            code="job_not_found"),
    Hostile("other-download", "GET", "/jobs/{other}/artifacts/adapter", status=404,
            code="job_not_found"),
    Hostile("events-after-text", "GET", "/jobs/{job}/events", params={"after": "abc"},
            status=422, field="after"),
    Hostile("events-after-negative", "GET", "/jobs/{job}/events", params={"after": -1},
            status=422, field="after"),
    Hostile("events-after-2-to-70", "GET", "/jobs/{job}/events", params={"after": 2**70},
            status=422, field="after"),
    Hostile("events-limit-zero", "GET", "/jobs/{job}/events", params={"limit": 0},
            status=422, field="limit"),
    Hostile("list-limit-text", "GET", "/jobs", params={"limit": "ten"}, status=422,
            field="limit"),
    Hostile("list-limit-negative", "GET", "/jobs", params={"limit": -1}, status=422,
            field="limit"),
    Hostile("list-limit-huge", "GET", "/jobs", params={"limit": 10**20}, status=422,
            field="limit"),
    Hostile("list-status-upper", "GET", "/jobs", params={"status": "RUNNING"}, status=422,
            field="status"),
    Hostile("list-status-sql", "GET", "/jobs", params={"status": "queued' OR '1'='1"},
            status=422, field="status"),
    Hostile("cursor-garbage", "GET", "/jobs", params={"after": "garbage!!"}, status=422,
            code="invalid_request", field="after"),
    Hostile("cursor-not-json", "GET", "/jobs", params={"after": _b64("not json")},
            status=422, field="after"),
    Hostile("cursor-json-list", "GET", "/jobs", params={"after": _b64("[1, 2]")},
            status=422, field="after"),
    Hostile("cursor-wrong-types", "GET", "/jobs", params={"after": _b64('{"t": 1, "id": 2}')},
            status=422, field="after"),
    Hostile("cursor-naive-time", "GET", "/jobs", params={"after": _b64(json.dumps(
        {"t": "2026-01-01T00:00:00", "id": str(uuid.uuid4())}))}, status=422, field="after"),
    Hostile("cursor-bad-id", "GET", "/jobs", params={"after": _b64(json.dumps(
        {"t": "2026-01-01T00:00:00+00:00", "id": "nope"}))}, status=422, field="after"),
    Hostile("cursor-year-1-east-of-utc", "GET", "/jobs", params={"after": _b64(json.dumps(
        {"t": "0001-01-01T00:00:00+14:00", "id": str(uuid.uuid4())}))}, status=422,
        field="after"),
    Hostile("cursor-year-9999-west-of-utc", "GET", "/jobs", params={"after": _b64(json.dumps(
        {"t": "9999-12-31T23:59:59-14:00", "id": str(uuid.uuid4())}))}, status=422,
        field="after"),
    Hostile("cursor-nul", "GET", "/jobs", params={"after": "\u0000"}, status=422,
            field="after"),
    Hostile("cursor-too-long", "GET", "/jobs", params={"after": "A" * 600}, status=422,
            field="after"),
    # Headers.
    Hostile("idempotency-key-too-long", headers={"Idempotency-Key": "k" * 300}, status=422,
            field="Idempotency-Key"),
    Hostile("idempotency-key-space", headers={"Idempotency-Key": "two words"}, status=422,
            field="Idempotency-Key"),
    Hostile("idempotency-key-latin1", headers={"Idempotency-Key": "cl\u00e9".encode("latin-1")},
            status=422, field="Idempotency-Key"),
    Hostile("no-key-valid-body", auth=False, status=401, code="unauthorized"),
    Hostile("key-10k-chars", "GET", "/jobs", headers={"Authorization": "Bearer " + "x" * 10_000},
            auth=False, status=401, code="unauthorized"),
    Hostile("key-token-scheme", "GET", "/jobs", headers={"Authorization": "Token abc"},
            auth=False, status=401, code="unauthorized"),
    # Methods and routes that do not exist.
    Hostile("delete-job", "DELETE", "/jobs/{job}", status=405, code="method_not_allowed"),
    Hostile("put-jobs", "PUT", "/jobs", status=405, code="method_not_allowed"),
    Hostile("patch-job", "PATCH", "/jobs/{job}", status=405, code="method_not_allowed"),
    Hostile("get-cancel", "GET", "/jobs/{job}/cancel", status=405, code="method_not_allowed"),
    Hostile("post-events", "POST", "/jobs/{job}/events", status=405,
            code="method_not_allowed"),
    Hostile("unknown-route", "GET", "/admin", status=404, code="not_found"),
    Hostile("unknown-subroute", "GET", "/jobs/{job}/secrets", status=404, code="not_found"),
]


@dataclass
class World:
    """What placeholders stand for in one test."""

    key: str
    owner: str
    job: uuid.UUID
    other: uuid.UUID
    values: dict[str, str]

    def fill(self, value: Any) -> Any:
        """`value` with every placeholder replaced, recursively."""
        if isinstance(value, str):
            for name, text in self.values.items():
                value = value.replace("{" + name + "}", text)
            return value
        if isinstance(value, bytes):
            return self.fill(value.decode("latin-1")).encode("latin-1")
        if isinstance(value, dict):
            return {self.fill(k): self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value


@pytest.fixture
def world(make_api_key: Callable[..., str], db_session: Session, dataset_file: Path,
          service_env: dict[str, str]) -> World:
    key, other_key = make_api_key(), make_api_key()
    owners = {row.key_hash: row.owner for row in db_session.scalars(
        select(ApiKey).where(ApiKey.key_hash.in_([hash_key(key), hash_key(other_key)])))}
    now = datetime.now(UTC)
    jobs = [Job(owner=owners[hash_key(k)], status="succeeded", spec={"rank": 16},
                user_metadata={}, created_at=now, updated_at=now, finished_at=now)
            for k in (key, other_key)]
    db_session.add_all(jobs)
    db_session.commit()
    values = {"job": str(jobs[0].id), "other": str(jobs[1].id), "dataset": str(dataset_file),
              "datasets": service_env["GRALORA_DATASET_ROOTS"],
              "models": service_env["GRALORA_MODEL_ROOTS"]}
    return World(key, owners[hash_key(key)], jobs[0].id, jobs[1].id, values)


def _job_count(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner)) or 0


def test_at_least_sixty_cases_with_unique_names() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_hostile_request_gets_a_clean_4xx(api_client: TestClient, world: World,
                                          db_session: Session, case: Hostile) -> None:
    headers: dict[str, str | bytes] = {"Authorization": f"Bearer {world.key}"} if case.auth else {}
    headers.update(case.headers)
    kwargs: dict[str, Any] = {"headers": headers, "params": case.params}
    if case.content is not None:
        kwargs["content"] = world.fill(case.content)
    elif case.body is not UNSET:
        kwargs["json"] = case.body
    elif case.method == "POST" and case.path == "/jobs":
        request = {"base_model": "HuggingFaceTB/SmolLM2-135M",
                   "dataset_uri": "file://{dataset}", "rank": 16, **(case.changes or {})}
        kwargs["json"] = world.fill({k: v for k, v in request.items() if v is not None})
    before = _job_count(db_session, world.owner)

    response = api_client.request(case.method, world.fill(case.path), **kwargs)

    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert SNAKE_CASE.match(error["code"]), error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and "sqlalchemy" not in response.text.lower()
    if case.status is not None:
        assert response.status_code == case.status, error
    if case.code is not None:
        assert error["code"] == case.code, error
    if case.field is not None:
        assert error.get("field") == case.field, error
    assert _job_count(db_session, world.owner) == before  # nothing was created


# --- seeded fuzzing: many more shapes than the cases above, the same promise ----------------

FUZZ_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 16, 2**31, 2**63, 10**100, 0.5, -0.0, 1e308, 1e-308, "",
    "x", "16", "\u0000", "../../etc/passwd", "file:///etc/passwd", "http://127.0.0.1/",
    "org/model", "a" * 3000, [], [1], ["lora"], ["q_proj"], {}, {"a": "b"}, {"a": None},
    {"": ""}, [[]], [{}], "hf://datasets/a/b", "s3://bucket/key", "https://[::1]:99999/x",
    "http://[", "http://a:b@c", "file://", "file:", "~", "/", "\\\\server\\share", "C:\\x",
]
FUZZ_FIELDS = [
    "base_model", "dataset_uri", "rank", "k", "hybrid_rank", "alpha", "dropout",
    "target_modules", "epochs", "max_steps", "learning_rate", "batch_size",
    "gradient_accumulation_steps", "max_seq_length", "seed", "checkpoint_every_steps",
    "validation_uri", "exports", "metadata",
]


def _assert_clean(response: Any) -> None:
    assert response.status_code < 500, (response.request.url, response.text)
    if response.status_code >= 400:
        assert SNAKE_CASE.match(response.json()["error"]["code"]), response.text


def test_random_bodies_never_get_a_5xx(api_client: TestClient, world: World) -> None:
    rng = random.Random(20261201)
    headers = {"Authorization": f"Bearer {world.key}", "Content-Type": "application/json"}
    for _ in range(400):
        body = {"base_model": "org/model", "dataset_uri": world.fill("file://{dataset}"),
                "rank": 16}
        for _ in range(rng.randint(1, 4)):
            body[rng.choice(FUZZ_FIELDS)] = rng.choice(FUZZ_VALUES)
        response = api_client.post("/jobs", content=json.dumps(body).encode(), headers=headers)
        _assert_clean(response)
        if response.status_code == 201:  # stay under the active-job limit
            api_client.post(f"/jobs/{response.json()['id']}/cancel", headers=headers)


def test_random_paths_and_queries_never_get_a_5xx(api_client: TestClient,
                                                  world: World) -> None:
    rng = random.Random(1201)
    alphabet = string.printable + "\u00e9\u202e\u0000\ud7ff"
    headers = {"Authorization": f"Bearer {world.key}"}
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        part = quote(text, safe="")
        path = rng.choice([f"/jobs/{part}", f"/jobs/{part}/events", f"/jobs/{part}/cancel",
                           f"/jobs/{world.job}/artifacts/{part}", f"/jobs/{world.job}/events",
                           "/jobs"])
        params = rng.choice([{}, {"after": text}, {"limit": text}, {"status": text},
                             {"after": text, "limit": text}])
        method = "POST" if path.endswith("/cancel") else "GET"
        _assert_clean(api_client.request(method, path, params=params, headers=headers))
