"""Postgres unreachable from a training worker for a while: the job still ends well, once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from cli.processes import free_port
from tests.worker.client import JobsClient


class CuttableProxy:
    """A TCP relay to Postgres whose link can be cut (every connection dropped) and restored."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: socket.socket | None = None
        self._links: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones, as a crashed database host would."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            for link in self._links:
                try:
                    link.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                link.close()
            self._links.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._links += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture
def proxy(service_env: dict[str, str]) -> Iterator[CuttableProxy]:
    url = make_url(service_env["GRALORA_DATABASE_URL"])
    relay = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    relay.up()
    yield relay
    relay.down()


def test_worker_rides_out_a_database_outage(
        api_server: str, make_api_key: Callable[..., str], start_worker: Callable[..., Any],
        proxy: CuttableProxy, service_env: dict[str, str], service_model: Path,
        service_datasets: Path) -> None:
    client = JobsClient(api_server, make_api_key())
    via_proxy = make_url(service_env["GRALORA_DATABASE_URL"]).set(port=proxy.port)
    # The outage is shorter than the lease, so no other worker may take the job meanwhile.
    start_worker(GRALORA_DATABASE_URL=via_proxy.render_as_string(hide_password=False),
                 GRALORA_LEASE_SECONDS="30")
    job = client.submit(base_model=str(service_model),
                        dataset_uri=(service_datasets / "chat.jsonl").as_uri(), rank=16,
                        batch_size=4, max_seq_length=96, max_steps=150,
                        checkpoint_every_steps=10)
    client.wait_until(job["id"], {"running"}, min_step=5)
    proxy.down()
    time.sleep(6)  # progress writes, cancel checks and lease renewals all fail meanwhile
    proxy.up()

    done = client.wait_until(job["id"], {"succeeded"}, timeout=300)
    assert done["attempt"] == 1
    assert done["progress"]["step"] == 150
