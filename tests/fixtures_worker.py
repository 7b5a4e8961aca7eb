"""Real processes for end-to-end tests: the API under uvicorn and Celery workers on Redis.

Loaded as a pytest plugin by tests/conftest.py. Both run the same commands as production
(`gralora api`, `gralora worker`) with the session's `service_env` (tests/fixtures_db.py).

Fixtures:

- `api_server` (session): `gralora api` on a free loopback port; yields its base URL.
- `start_worker` (function): `start_worker(**env) -> WorkerProcess` starts `gralora worker`
  with short leases (WORKER_TEST_ENV, overridable) and waits until it is ready; every worker
  it started is stopped at the end of the test.
- `service_model` (session): the tiny Llama with weights, under the model root.
- `service_datasets` (session): the example datasets copied under the dataset root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cli.processes import free_port, gralora_command, stop_process_group

REPO = Path(__file__).resolve().parents[1]
# Short leases so that crash recovery happens within seconds in tests.
WORKER_TEST_ENV = {
    "GRALORA_LEASE_SECONDS": "6",
    "GRALORA_REAPER_INTERVAL_SECONDS": "2",
    "GRALORA_MAX_ATTEMPTS": "3",
    "GRALORA_PROGRESS_INTERVAL_SECONDS": "0.5",
}
READY_TIMEOUT = 90.0


class WorkerProcess:
    """A running `gralora worker` and its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        """Everything the worker has printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until Celery says the worker is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()[-4000:]}")
            if " ready." in self.log():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()[-4000:]}")

    def kill_hard(self) -> None:
        """kill -9 the worker and its children, as a crashed host would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self) -> None:
        """Stop gracefully, then by force."""
        stop_process_group(self.process)


@pytest.fixture(scope="session")
def api_server(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """`gralora api` on a free port, on the session's database and broker."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            gralora_command("api", "--host", "127.0.0.1", "--port", str(port)),
            cwd=REPO, env={**os.environ, **service_env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API did not start:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        stop_process_group(process)


@pytest.fixture
def start_worker(service_env: dict[str, str], tmp_path: Path
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    """A factory of ready `gralora worker` processes, all stopped after the test."""
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                gralora_command("worker", "--loglevel", "INFO"), cwd=REPO,
                env={**os.environ, **service_env, **WORKER_TEST_ENV, **env,
                     "PYTHONUNBUFFERED": "1"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        worker = WorkerProcess(process, log_path)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def service_model(service_env: dict[str, str]) -> Path:
    """The tiny Llama with weights and tokenizer, under the model root."""
    from gralora.tiny import build_tiny_model

    return build_tiny_model(Path(service_env["GRALORA_MODEL_ROOTS"]) / "tiny")


@pytest.fixture(scope="session")
def service_datasets(service_env: dict[str, str]) -> Path:
    """The examples/ datasets, copied under the dataset root."""
    target = Path(service_env["GRALORA_DATASET_ROOTS"]) / "examples"
    shutil.copytree(REPO / "examples", target, dirs_exist_ok=True)
    return target
