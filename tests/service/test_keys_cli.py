"""`gralora create-key` and `gralora keys create|list|revoke`, run as commands, seen by the API."""

from __future__ import annotations

import os
import subprocess
import sys

from fastapi.testclient import TestClient

from tests.fixtures_worker import REPO


def gralora(service_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, **service_env})


def test_created_key_works_until_revoked(service_env: dict[str, str],
                                         api_client: TestClient) -> None:
    created = gralora(service_env, "create-key", "--owner", "cli-owner")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    assert api_client.get("/jobs", headers=headers).status_code == 200

    listed = gralora(service_env, "keys", "list", "--owner", "cli-owner")
    assert listed.returncode == 0 and key[:12] in listed.stdout
    assert key not in listed.stdout  # only a prefix is ever shown again

    revoked = gralora(service_env, "keys", "revoke", "--prefix", key[:12])
    assert revoked.returncode == 0, revoked.stderr
    response = api_client.get("/jobs", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_revoking_an_unknown_key_fails_cleanly(service_env: dict[str, str]) -> None:
    result = gralora(service_env, "keys", "revoke", "--prefix", "glr_nonexistent")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
