"""The whole service with real processes: uvicorn API, Celery worker, Postgres and Redis."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.worker.client import JobsClient


@pytest.fixture
def client(api_server: str, make_api_key: Callable[..., str]) -> JobsClient:
    return JobsClient(api_server, make_api_key())


def small_job(model: Path, dataset: Path, **changes: Any) -> dict[str, Any]:
    """A job on the tiny model that trains in seconds."""
    return {"base_model": str(model), "dataset_uri": dataset.as_uri(), "rank": 16,
            "max_steps": 12, "batch_size": 4, "max_seq_length": 96, "learning_rate": 3e-3,
            **changes}


def test_job_trains_and_its_adapter_loads_with_peft(
        client: JobsClient, start_worker: Callable[..., Any], service_model: Path,
        service_datasets: Path, tmp_path: Path) -> None:
    start_worker()
    created = client.submit(**small_job(service_model, service_datasets / "chat.jsonl",
                                        exports=["lora"], metadata={"team": "search"}))
    assert created["status"] == "queued"
    assert created["spec"]["k"] == 2 and created["spec"]["alpha"] == 32.0
    job = client.wait_until(created["id"], {"succeeded"})
    assert job["attempt"] == 1 and job["error"] is None and job["metadata"] == {"team": "search"}
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 12
    assert job["started_at"] and job["finished_at"]

    listed = client.http.get(f"/jobs/{job['id']}/artifacts").json()["data"]
    assert {a["name"] for a in listed} == {"adapter", "lora", "manifest"}
    archive = client.download(job["id"], "adapter", tmp_path / "adapter.zip")
    entry = next(a for a in listed if a["name"] == "adapter")
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == entry["sha256"]
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path / "adapter")

    ids = torch.randint(5, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(service_model).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        tuned_logits = tuned(input_ids=ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3

    kinds = [e["type"] for e in client.events(job["id"])]
    for kind in ("status", "dataset", "preflight", "metrics", "artifact"):
        assert kind in kinds, kinds


def test_bad_dataset_fails_with_line_numbers(
        client: JobsClient, start_worker: Callable[..., Any], service_model: Path,
        service_datasets: Path) -> None:
    start_worker()
    created = client.submit(**small_job(service_model, service_datasets / "bad.jsonl"))
    job = client.wait_until(created["id"], {"failed"})
    assert job["error"]["code"] == "invalid_dataset"
    assert "line 2" in job["error"]["message"]
    assert "Traceback" not in job["error"]["message"]


def test_cancel_stops_a_running_job_and_the_worker_takes_the_next(
        client: JobsClient, start_worker: Callable[..., Any], service_model: Path,
        service_datasets: Path) -> None:
    start_worker()
    long_job = client.submit(**small_job(service_model, service_datasets / "chat.jsonl",
                                         max_steps=5000, checkpoint_every_steps=5))
    client.wait_until(long_job["id"], {"running"}, min_step=3)
    response = client.http.post(f"/jobs/{long_job['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] in ("cancelling", "cancelled")
    cancelled = client.wait_until(long_job["id"], {"cancelled"}, timeout=30)
    assert cancelled["progress"]["step"] < 5000
    assert client.http.post(f"/jobs/{long_job['id']}/cancel").status_code == 409

    following = client.submit(**small_job(service_model, service_datasets / "chat.jsonl"))
    client.wait_until(following["id"], {"succeeded"})
