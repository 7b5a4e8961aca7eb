"""Artifact store: the local folder and an S3 bucket (a real moto_server process) behave alike."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from service.storage import (
    ArtifactStore,
    InvalidStorageKey,
    LocalArtifactStore,
    S3ArtifactStore,
    get_artifact_store,
)

BUCKET = "gralora-test-artifacts"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in its own process, with fake credentials in the environment."""
    moto = Path(sys.executable).with_name("moto_server")
    port = _free_port()
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """Each test runs against both stores, built from settings as the worker builds them."""
    if request.param == "local":
        settings = Settings(artifacts_dir=tmp_path / "artifacts")
    else:
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"{BUCKET}-{tmp_path.name.lower().replace('_', '-')}"[:63]
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        settings = Settings(artifacts_s3_bucket=bucket, s3_endpoint_url=endpoint,
                            artifacts_s3_prefix="artifacts")
    built = get_artifact_store(settings)
    assert isinstance(built, LocalArtifactStore if request.param == "local" else S3ArtifactStore)
    return built


def test_put_then_iter_returns_the_same_bytes(store: ArtifactStore, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    source = tmp_path / "adapter.zip"
    source.write_bytes(payload)
    store.put_file(source, "job-1/adapter.zip")

    assert store.exists("job-1/adapter.zip")
    chunks = list(store.iter_bytes("job-1/adapter.zip", chunk_size=64 * 1024))
    assert b"".join(chunks) == payload
    assert len(chunks) > 1  # streamed, not read whole


def test_put_replaces_an_existing_key(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "a.zip"
    source.write_bytes(b"first")
    store.put_file(source, "job-2/a.zip")
    source.write_bytes(b"second")
    store.put_file(source, "job-2/a.zip")
    assert b"".join(store.iter_bytes("job-2/a.zip")) == b"second"


def test_missing_key(store: ArtifactStore) -> None:
    assert not store.exists("nope/adapter.zip")
    with pytest.raises(FileNotFoundError):
        b"".join(store.iter_bytes("nope/adapter.zip"))


def test_delete_prefix_removes_only_that_job(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "x.zip"
    source.write_bytes(b"x")
    for key in ("job-3/adapter.zip", "job-3/merged.zip", "job-33/adapter.zip"):
        store.put_file(source, key)

    assert store.delete_prefix("job-3/") == 2
    assert not store.exists("job-3/adapter.zip")
    assert not store.exists("job-3/merged.zip")
    assert store.exists("job-33/adapter.zip")


@pytest.mark.parametrize("key", ["../outside.zip", "a/../../outside.zip", "/etc/passwd",
                                 "", "a\\..\\b", "a/./b", "dir/"])
def test_keys_that_could_escape_are_refused(store: ArtifactStore, tmp_path: Path,
                                            key: str) -> None:
    source = tmp_path / "x.zip"
    source.write_bytes(b"x")
    with pytest.raises(InvalidStorageKey):
        store.put_file(source, key)
    with pytest.raises(InvalidStorageKey):
        store.exists(key)


def test_local_store_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.zip").write_bytes(b"secret")
    root.mkdir()
    (root / "job").symlink_to(outside)
    store = LocalArtifactStore(root)
    with pytest.raises(InvalidStorageKey):
        list(store.iter_bytes("job/secret.zip"))


def test_s3_store_writes_under_its_prefix(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="prefix-check")
    source = tmp_path / "x.zip"
    source.write_bytes(b"x")
    S3ArtifactStore("prefix-check", prefix="artifacts/", endpoint_url=s3_endpoint).put_file(
        source, "job-4/adapter.zip")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="prefix-check")["Contents"]]
    assert keys == ["artifacts/job-4/adapter.zip"]
