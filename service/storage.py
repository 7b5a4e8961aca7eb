"""Artifact store: a local folder by default, an S3-compatible bucket when configured.

Keys are made by the worker (`<job_id>/<name>.zip`), never taken from a request; both stores
still refuse keys that could point outside their root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from service.settings import Settings, get_settings

DEFAULT_CHUNK_SIZE = 1 << 20


class InvalidStorageKey(ValueError):
    """A key that is empty, absolute or climbs out of the store's root."""


def check_key(key: str) -> str:
    """Return `key` if it is a plain relative POSIX path, else raise InvalidStorageKey."""
    if not key or "\\" in key or "\x00" in key or key.startswith("/"):
        raise InvalidStorageKey(f"invalid storage key {key!r}")
    # Split by hand: PurePosixPath would silently drop "." and empty segments.
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidStorageKey(f"invalid storage key {key!r}")
    return key


class ArtifactStore(Protocol):
    """Where finished artifacts live; the API streams them back from here."""

    def put_file(self, local_path: Path, key: str) -> None:
        """Store the file at `local_path` under `key` (replacing what was there)."""

    def iter_bytes(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The stored bytes in chunks (FileNotFoundError when missing)."""

    def exists(self, key: str) -> bool:
        """Whether `key` is stored."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` (e.g. `<job_id>/`); returns how many went."""


class LocalArtifactStore:
    """Artifacts as files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        """The file for `key`, refusing anything that resolves outside the root (symlinks too)."""
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidStorageKey(f"storage key {key!r} escapes the artifact root")
        return path

    def put_file(self, local_path: Path, key: str) -> None:
        """Copy aside then rename, so a reader never sees a half-written artifact."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, DEFAULT_CHUNK_SIZE)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def iter_bytes(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Read the file in chunks."""
        path = self._path(key)
        # Open before the first next() so a missing key fails where the caller asks for it.
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
        return _read_chunks(handle, chunk_size)

    def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        """Delete files whose key starts with `prefix`, then any folders left empty."""
        # Only walk the folder the prefix names (`<job_id>/` -> that job's folder).
        folder, _, _ = prefix.rpartition("/")
        base = self._path(folder) if folder else self.root
        if not base.is_dir():
            return 0
        count = 0
        for path in sorted(base.rglob("*"), reverse=True):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel.startswith(prefix):
                path.unlink()
                count += 1
            elif path.is_dir() and (rel + "/").startswith(prefix) and not any(path.iterdir()):
                path.rmdir()
        if folder and base != self.root and base.is_dir() and not any(base.iterdir()):
            base.rmdir()
        return count


def _read_chunks(handle: Any, chunk_size: int) -> Iterator[bytes]:
    """Yield chunks from an open binary file and close it at the end."""
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


class S3ArtifactStore:
    """Artifacts as objects in an S3-compatible bucket, under an optional key prefix."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 client: Any = None) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, local_path: Path, key: str) -> None:
        """Upload (multipart for big files; S3 makes the object visible only when complete)."""
        self.client.upload_file(str(local_path), self.bucket, self._object_key(key))

    def iter_bytes(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the object in chunks."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(key) from exc
            raise
        body = response["Body"]
        return _stream_body(body, chunk_size)

    def exists(self, key: str) -> bool:
        """Whether the object exists (HEAD request)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the prefix, 1000 per request (the S3 limit)."""
        check_key(prefix.rstrip("/") or "x")
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        count = 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
        return count


def _stream_body(body: Any, chunk_size: int) -> Iterator[bytes]:
    """Yield chunks of a botocore StreamingBody and close it at the end."""
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()


def _is_not_found(exc: Any) -> bool:
    """Whether a botocore ClientError means the object (or bucket) does not exist."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def get_artifact_store(settings: Settings | None = None) -> ArtifactStore:
    """The configured store: S3 when a bucket is set, else the local artifacts folder."""
    settings = settings or get_settings()
    if settings.artifacts_s3_bucket:
        return S3ArtifactStore(settings.artifacts_s3_bucket, prefix=settings.artifacts_s3_prefix,
                               endpoint_url=settings.s3_endpoint_url)
    return LocalArtifactStore(settings.resolved_artifacts_dir)
