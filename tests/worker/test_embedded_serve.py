"""`gralora serve` with no configuration (SQLite database and broker) runs a job end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.processes import free_port, gralora_command, stop_process_group
from gralora.tiny import build_tiny_model
from tests.fixtures_worker import REPO
from tests.worker.client import JobsClient


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """`gralora serve` in an empty folder, as on a fresh laptop: (url, api key, folder)."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    port = free_port()
    # Nothing of the test session's Postgres/Redis configuration may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRALORA_")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(gralora_command("serve", "--port", str(port)), cwd=tmp_path,
                                   env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        key = None
        while key is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start:\n{log_path.read_text()[-4000:]}")
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("API key: "):
                    key = line.removeprefix("API key: ").strip()
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", key, tmp_path
    finally:
        stop_process_group(process)


def test_embedded_mode_trains_a_job_end_to_end(served: tuple[str, str, Path]) -> None:
    url, key, folder = served
    assert (folder / "gralora-data" / "gralora.db").is_file()  # SQLite, no server
    model = build_tiny_model(folder / "gralora-data" / "models" / "tiny")
    client = JobsClient(url, key)
    job = client.submit(base_model=str(model),
                        dataset_uri=(folder / "examples" / "chat.jsonl").as_uri(),
                        rank=16, max_steps=8, batch_size=4, max_seq_length=96)
    done = client.wait_until(job["id"], {"succeeded"}, timeout=300)
    assert done["progress"]["step"] == 8
    archive = client.download(job["id"], "adapter", folder / "adapter.zip")
    with zipfile.ZipFile(archive) as zipped:
        assert "adapter_config.json" in zipped.namelist()
