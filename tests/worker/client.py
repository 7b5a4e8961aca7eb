"""A small HTTP client for the jobs API, used by the end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


class JobsClient:
    """Talks to a running API with one key."""

    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"})

    def submit(self, **body: Any) -> dict[str, Any]:
        """POST /jobs; asserts 201."""
        response = self.http.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def get(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of the job, following the cursor."""
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.http.get(f"/jobs/{job_id}/events", params={"after": after}).json()
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                return found
            after = page["data"][-1]["seq"]

    def wait_until(self, job_id: str, statuses: set[str], timeout: float = 180.0,
                   min_step: int = 0) -> dict[str, Any]:
        """Poll until the job is in one of `statuses` (and past `min_step`); fail on timeout."""
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get(job_id)
            step = (job.get("progress") or {}).get("step") or 0
            if job["status"] in statuses and step >= min_step:
                return job
            if job["status"] in TERMINAL - statuses:
                raise AssertionError(f"job ended {job['status']}: {job.get('error')}")
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {job}")

    def download(self, job_id: str, name: str, target: Path) -> Path:
        """Download an artifact zip to `target`."""
        response = self.http.get(f"/jobs/{job_id}/artifacts/{name}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/zip"
        target.write_bytes(response.content)
        return target
