"""Dataset sources: check a dataset URI cheaply, then fetch it to a local file with its sha256.

Schemes: file:// and plain paths, http(s)://, s3://bucket/key and
hf://datasets/<org>/<name>[@revision][/path-in-repo].
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from gralora.errors import DatasetRefused, DatasetTooLarge, DatasetUnavailable
from gralora.netguard import resolve_public
from gralora.pipeline import SourceOptions

ALLOWED_SCHEMES = ("file", "http", "https", "s3", "hf")
MAX_URI_CHARS = 4096
MAX_REDIRECTS = 5
HTTP_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=10.0)
CHUNK_BYTES = 1 << 20
USER_AGENT = "gralora-service (dataset fetch)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_LIKE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_HF_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_HF_SYNTAX = "hf://datasets/<org>/<name>[@revision][/path-in-repo]"
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


@dataclass
class FetchedFile:
    """A dataset fetched to local disk: where it is, what it hashes to, where it came from."""

    path: Path
    sha256: str
    size_bytes: int
    uri: str


@dataclass(frozen=True)
class _HfLocation:
    """A parsed hf:// dataset URI."""

    repo_id: str
    revision: str | None
    filename: str | None


# --------------------------------------------------------------------------- public API


def check_dataset_uri(uri: str, options: SourceOptions, *,
                      s3_buckets: Collection[str] | None = None) -> None:
    """Refuse a dataset URI that could never be fetched under `options`, without downloading it.

    `s3_buckets`, when given, is the only set of buckets s3:// URIs may name.
    """
    _check(uri, options, _buckets(options, s3_buckets))


def fetch_dataset(uri: str, options: SourceOptions, *,
                  s3_buckets: Collection[str] | None = None) -> FetchedFile:
    """Check `uri`, then bring the dataset to a local file (local files are used in place)."""
    s3_buckets = _buckets(options, s3_buckets)
    scheme = _check(uri, options, s3_buckets)
    if scheme in ("file", ""):
        return _fetch_local(_local_path(uri, scheme, options), uri, options.max_bytes)
    if scheme in ("http", "https"):
        return _fetch_http(uri, options)
    if scheme == "s3":
        bucket, key = _parse_s3(uri, s3_buckets)
        return _fetch_s3(bucket, key, uri, options)
    return _fetch_hf(_parse_hf(uri), uri, options)


# --------------------------------------------------------------------------- checks


def _buckets(options: SourceOptions, s3_buckets: Collection[str] | None) -> Collection[str] | None:
    """The bucket allowlist: the explicit argument, else the options' own."""
    return s3_buckets if s3_buckets is not None else options.s3_buckets


def _check(uri: str, options: SourceOptions, s3_buckets: Collection[str] | None) -> str:
    """Run the static checks for `uri` and return its scheme ("" for a plain path)."""
    if not uri:
        raise DatasetRefused("the dataset URI is empty", field="dataset_uri")
    if len(uri) > MAX_URI_CHARS:
        raise DatasetRefused(f"the dataset URI is longer than {MAX_URI_CHARS} characters",
                             field="dataset_uri")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri):
        raise DatasetRefused("the dataset URI contains control characters", field="dataset_uri")
    scheme = _scheme_of(uri)
    if scheme in ("file", ""):
        _local_path(uri, scheme, options)
    elif scheme in ("http", "https"):
        _check_http_url(_parse_http(uri), options)
    elif scheme == "s3":
        _parse_s3(uri, s3_buckets)
    elif scheme == "hf":
        _parse_hf(uri)
    else:
        raise DatasetRefused(
            f"unsupported dataset URI scheme {scheme!r}; use one of: "
            f"{', '.join(s + '://' for s in ALLOWED_SCHEMES)} or a local path",
            field="dataset_uri")
    return scheme


def _scheme_of(uri: str) -> str:
    """The lower-cased scheme of `uri`, or "" for a plain path."""
    match = _SCHEME.match(uri)
    # A one-letter "scheme" is a Windows drive ("C:\data"), i.e. a plain path.
    if match is None or len(match.group(1)) == 1:
        return ""
    return match.group(1).lower()


def _after_scheme(uri: str, scheme: str, syntax: str) -> str:
    """The part of `uri` after "<scheme>://"; DatasetRefused when the "//" is missing."""
    rest = uri[len(scheme) + 1:]
    if not rest.startswith("//"):
        raise DatasetRefused(f"{uri!r} is not of the form {syntax}", field="dataset_uri")
    return rest[2:]


def _local_path(uri: str, scheme: str, options: SourceOptions) -> Path:
    """The real path of a file:// URI or plain path, refused when outside the dataset roots."""
    if scheme == "" and options.dataset_roots is not None:
        raise DatasetRefused("plain paths are for the CLI; name the file as file:///absolute/path",
                             field="dataset_uri")
    raw = _file_uri_path(uri) if scheme == "file" else uri
    if options.dataset_roots is not None and not raw.startswith("/"):
        # Relative to whatever folder the worker runs in would mean nothing to the caller.
        raise DatasetRefused(f"the dataset path {raw!r} must be absolute", field="dataset_uri")
    if "\x00" in raw:
        raise DatasetRefused("the dataset path contains a NUL byte", field="dataset_uri")
    if ".." in PurePosixPath(raw).parts:
        raise DatasetRefused(f"'..' is not allowed in a dataset path: {raw!r}",
                             field="dataset_uri")
    # Resolve symlinks before the root check, so a link pointing out of a root is seen as outside.
    resolved = Path(raw).resolve()
    if options.dataset_roots is not None:
        roots = [Path(root).resolve() for root in options.dataset_roots]
        if not any(resolved.is_relative_to(root) for root in roots):
            raise DatasetRefused(f"{raw!r} is not inside an allowed dataset folder",
                                 field="dataset_uri")
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise DatasetUnavailable(f"dataset file {raw!r} does not exist",
                                 field="dataset_uri") from None
    except OSError as exc:
        raise DatasetUnavailable(f"cannot read dataset file {raw!r}: {exc.strerror}",
                                 field="dataset_uri") from None
    if not stat.S_ISREG(mode):
        # Devices, FIFOs and folders are refused: /dev/zero would never end.
        raise DatasetRefused(f"{raw!r} is not a regular file", field="dataset_uri")
    return resolved


def _file_uri_path(uri: str) -> str:
    """The decoded local path of a file: URI (file:///abs, file://localhost/abs, file:rel)."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise DatasetRefused(f"file URIs must name a local path, not host {parts.netloc!r}",
                             field="dataset_uri")
    if parts.query or parts.fragment or uri.endswith(("?", "#")):
        raise DatasetRefused("a file URI may not have '?' or '#'; percent-encode them in names",
                             field="dataset_uri")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise DatasetRefused("the file URI is not valid percent-encoded UTF-8",
                             field="dataset_uri") from None
    if not path:
        raise DatasetRefused("the file URI has no path", field="dataset_uri")
    return path


def _parse_http(uri: str) -> httpx.URL:
    """Parse an http(s) URL; DatasetRefused when it is malformed."""
    try:
        url = httpx.URL(uri)
    except httpx.InvalidURL as exc:
        raise DatasetRefused(f"invalid URL: {exc}", field="dataset_uri") from None
    return url


def _check_http_url(url: httpx.URL, options: SourceOptions) -> list[str] | None:
    """Refuse a URL we will not fetch; return the addresses to pin to (None: no pinning)."""
    if url.scheme not in ("http", "https"):
        raise DatasetRefused(f"only http and https URLs can be fetched, not {url.scheme!r}",
                             field="dataset_uri")
    if not url.host:
        raise DatasetRefused("the URL has no host", field="dataset_uri")
    if url.userinfo:
        # Credentials would be stored with the job and shown in its records.
        raise DatasetRefused("credentials in the URL are not accepted", field="dataset_uri")
    if url.port is not None and not 0 < url.port < 65536:
        raise DatasetRefused(f"invalid port {url.port}", field="dataset_uri")
    if options.allow_private_urls:
        return None
    return resolve_public(url.raw_host.decode("ascii"), _port_of(url))


def _port_of(url: httpx.URL) -> int:
    """The port a URL connects to, defaults included."""
    return url.port or (443 if url.scheme == "https" else 80)


def _parse_s3(uri: str, buckets: Collection[str] | None) -> tuple[str, str]:
    """Split s3://bucket/key, checking the bucket name and the allowlist."""
    rest = _after_scheme(uri, "s3", "s3://<bucket>/<key>")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise DatasetRefused(f"{uri!r} must name a bucket and a key: s3://<bucket>/<key>",
                             field="dataset_uri")
    if not _S3_BUCKET.match(bucket) or ".." in bucket or _IPV4_LIKE.match(bucket):
        raise DatasetRefused(f"{bucket!r} is not a valid S3 bucket name", field="dataset_uri")
    if len(key.encode()) > 1024:
        raise DatasetRefused("the S3 key is longer than 1024 bytes", field="dataset_uri")
    if buckets is not None and bucket not in buckets:
        raise DatasetRefused(f"bucket {bucket!r} is not one the service may read datasets from",
                             field="dataset_uri")
    return bucket, key


def _parse_hf(uri: str) -> _HfLocation:
    """Parse hf://datasets/<org>/<name>[@revision][/path-in-repo]."""
    rest = _after_scheme(uri, "hf", _HF_SYNTAX)
    kind, _, rest = rest.partition("/")
    if kind != "datasets":
        raise DatasetRefused(f"only Hub datasets can be used: {_HF_SYNTAX}", field="dataset_uri")
    org, _, rest = rest.partition("/")
    name_rev, _, path = rest.partition("/")
    name, at, revision = name_rev.partition("@")
    for label, value in (("organization", org), ("dataset name", name)):
        if not _HF_NAME.match(value) or ".." in value:
            raise DatasetRefused(f"invalid {label} {value!r} in {uri!r}; expected {_HF_SYNTAX}",
                                 field="dataset_uri")
    # A revision with "/" (refs/pr/1) is written percent-encoded, as the Hub's own URIs do.
    revision = unquote(revision)
    if at and (not _HF_REVISION.match(revision) or ".." in revision.split("/")):
        raise DatasetRefused(f"invalid revision {revision!r} in {uri!r}", field="dataset_uri")
    if path and any(part in ("", ".", "..") for part in path.split("/")):
        raise DatasetRefused(f"invalid path {path!r} in {uri!r}", field="dataset_uri")
    return _HfLocation(repo_id=f"{org}/{name}", revision=revision or None, filename=path or None)


# --------------------------------------------------------------------------- local files


def _fetch_local(path: Path, uri: str, max_bytes: int) -> FetchedFile:
    """Hash a local file in place, refusing it when over the size cap."""
    # O_NOFOLLOW: the checked path has no symlink at its end, so one appearing now is an attack.
    # O_NONBLOCK: a FIFO swapped in after the check must not hang the open.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DatasetUnavailable(f"cannot open dataset file {str(path)!r}: {exc.strerror}",
                                 field="dataset_uri") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DatasetRefused(f"{str(path)!r} is not a regular file", field="dataset_uri")
        _check_size(info.st_size, max_bytes, uri)
        digest, size = _hash_capped(iter(lambda: handle.read(CHUNK_BYTES), b""), max_bytes, uri)
    return FetchedFile(path=path, sha256=digest, size_bytes=size, uri=uri)


def _hash_capped(chunks: Iterable[bytes], max_bytes: int, uri: str,
                 sink: Any = None) -> tuple[str, int]:
    """sha256 and size of `chunks`, written to `sink` if given; DatasetTooLarge past the cap."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        _check_size(size, max_bytes, uri)
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest(), size


def _check_size(size: int, max_bytes: int, uri: str) -> None:
    """DatasetTooLarge when `size` is over `max_bytes`."""
    if size > max_bytes:
        raise DatasetTooLarge(
            f"the dataset {_redact(uri)} is larger than the {_human_bytes(max_bytes)} limit",
            field="dataset_uri", details={"max_bytes": max_bytes})


def _human_bytes(count: int) -> str:
    """`count` bytes in the largest binary unit that keeps it >= 1."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"


def _redact(uri: str) -> str:
    """`uri` without query string or credentials, for messages (signed URLs carry secrets)."""
    parts = urlsplit(uri)
    if not parts.scheme or parts.scheme == "file" or len(parts.scheme) == 1:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


# --------------------------------------------------------------------------- the cache


def _cache_path(uri: str, options: SourceOptions) -> Path:
    """Where the download of `uri` lives: named by the URI's sha256, keeping a safe suffix."""
    suffix = PurePosixPath(unquote(urlsplit(uri).path)).suffix
    name = hashlib.sha256(uri.encode()).hexdigest() + (suffix if _SAFE_SUFFIX.match(suffix) else "")
    return options.cache_dir / name


def _download_to_cache(chunks: Iterable[bytes], uri: str, options: SourceOptions) -> FetchedFile:
    """Stream `chunks` into the cache under a temporary name, then rename; no partial remains."""
    final = _cache_path(uri, options)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=final.parent, prefix=".partial-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as sink:
            digest, size = _hash_capped(chunks, options.max_bytes, uri, sink)
        os.replace(temp_name, final)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return FetchedFile(path=final, sha256=digest, size_bytes=size, uri=uri)


# --------------------------------------------------------------------------- http(s)


def _fetch_http(uri: str, options: SourceOptions) -> FetchedFile:
    """Download an http(s) URL, following at most MAX_REDIRECTS redirects, each one re-checked."""
    url = _parse_http(uri)
    # A proxy from the environment would defeat address pinning, so only the CLI (which allows
    # private URLs and pins nothing) honours HTTP(S)_PROXY. An explicit transport keeps httpx
    # from reading proxies while still honouring SSL_CERT_FILE / SSL_CERT_DIR.
    transport = None if options.allow_private_urls else httpx.HTTPTransport(trust_env=True)
    with httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False, transport=transport,
                      trust_env=True) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            pinned = _check_http_url(url, options)
            with _open_response(client, url, pinned) as response:
                if response.status_code in _REDIRECT_STATUSES:
                    url = _redirect_target(url, response)
                    continue
                _raise_for_status(url, response)
                length = response.headers.get("content-length")
                if length is not None and length.isdigit():
                    _check_size(int(length), options.max_bytes, uri)
                try:
                    return _download_to_cache(response.iter_bytes(CHUNK_BYTES), uri, options)
                except httpx.HTTPError as exc:
                    raise _http_unavailable(url, exc) from None
    raise DatasetUnavailable(f"{_redact(uri)} redirected more than {MAX_REDIRECTS} times",
                             field="dataset_uri")


@contextmanager
def _open_response(client: httpx.Client, url: httpx.URL,
                   pinned: list[str] | None) -> Iterator[httpx.Response]:
    """Send a GET for `url`, connecting to the pinned addresses in turn when there are some."""
    last_error: httpx.HTTPError | None = None
    for request in _requests_for(client, url, pinned):
        try:
            response = client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last_error = exc  # try the host's next address
            continue
        except httpx.HTTPError as exc:
            raise _http_unavailable(url, exc) from None
        try:
            yield response
        finally:
            response.close()
        return
    if last_error is None:  # resolve_public never returns an empty list; kept for safety
        raise DatasetUnavailable(f"{url.host} has no address to connect to", field="dataset_uri")
    raise _http_unavailable(url, last_error)


def _requests_for(client: httpx.Client, url: httpx.URL,
                  pinned: list[str] | None) -> Iterator[httpx.Request]:
    """One request per address to try: the URL itself, or the URL aimed at each pinned address."""
    headers = {"User-Agent": USER_AGENT}
    if pinned is None:
        yield client.build_request("GET", url, headers=headers)
        return
    host_header = url.netloc.decode("ascii")  # the name (and explicit port) the server expects
    for address in pinned:
        target = url.copy_with(host=address)
        extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
        yield client.build_request("GET", target, headers={**headers, "Host": host_header},
                                   extensions=extensions)


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL:
    """The absolute URL a redirect points to; DatasetRefused for a non-http(s) target."""
    location = response.headers.get("location")
    if not location:
        raise DatasetUnavailable(
            f"{url.host} answered HTTP {response.status_code} without a Location header",
            field="dataset_uri")
    try:
        target = url.join(location)
    except httpx.InvalidURL as exc:
        raise DatasetUnavailable(f"{url.host} redirected to an invalid URL: {exc}",
                                 field="dataset_uri") from None
    if target.scheme not in ("http", "https"):
        raise DatasetRefused(f"{url.host} redirected to a {target.scheme!r} URL, which is refused",
                             field="dataset_uri")
    return target.copy_with(fragment=None)


def _raise_for_status(url: httpx.URL, response: httpx.Response) -> None:
    """DatasetUnavailable unless the response is a 200 with the file."""
    if response.status_code == 200:
        return
    shown = _redact(str(url))
    if response.status_code == 404:
        message = f"{shown} was not found (HTTP 404 from {url.host})"
    elif response.status_code in (401, 403):
        message = (f"{url.host} refused access to {shown} (HTTP {response.status_code}); "
                   "use a public or pre-signed URL")
    else:
        message = f"{url.host} answered HTTP {response.status_code} for {shown}"
    raise DatasetUnavailable(message, field="dataset_uri",
                             details={"status_code": response.status_code})


def _http_unavailable(url: httpx.URL, exc: httpx.HTTPError) -> DatasetUnavailable:
    """The DatasetUnavailable for a transport failure talking to `url`."""
    if isinstance(exc, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        what = "could not be reached"
    else:
        what = "broke off the transfer"
    return DatasetUnavailable(f"{url.host} {what} while fetching {_redact(str(url))}: {exc}",
                              field="dataset_uri")


# --------------------------------------------------------------------------- s3


def _fetch_s3(bucket: str, key: str, uri: str, options: SourceOptions) -> FetchedFile:
    """Download s3://bucket/key: size from head_object, then a capped streamed get_object."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3})
    try:
        # A fresh session: boto3's default one keeps the first credentials it found forever.
        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=options.s3_endpoint_url, config=config)
        head = client.head_object(Bucket=bucket, Key=key)
        _check_size(int(head.get("ContentLength", 0)), options.max_bytes, uri)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return _download_to_cache(body.iter_chunks(CHUNK_BYTES), uri, options)
        finally:
            body.close()
    except ClientError as exc:
        raise _s3_client_error(bucket, key, exc) from None
    except BotoCoreError as exc:
        raise _s3_transport_error(bucket, key, exc) from None


def _s3_client_error(bucket: str, key: str, exc: Any) -> DatasetUnavailable:
    """An actionable DatasetUnavailable for an error answer from S3."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    where = f"s3://{bucket}/{key}"
    if code == "NoSuchBucket":
        message = f"bucket {bucket!r} does not exist; check the bucket name in {where}"
    elif code in ("NoSuchKey", "404", "NotFound"):
        # head_object answers a bare 404 for both a missing key and a missing bucket.
        message = f"{where} does not exist; check the bucket and key"
    elif code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        message = (f"access to {where} was denied; grant the service's credentials "
                   "s3:GetObject on it")
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        message = f"S3 rejected the service's credentials ({code}) while reading {where}"
    else:
        message = f"S3 answered {code or 'an error'} for {where}: {exc}"
    return DatasetUnavailable(message, field="dataset_uri", details={"s3_error": code})


def _s3_transport_error(bucket: str, key: str, exc: Exception) -> DatasetUnavailable:
    """An actionable DatasetUnavailable for a failure before or while talking to S3."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        message = (f"no AWS credentials to read {where}; set AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY (or an instance role)")
    else:
        message = f"could not read {where} from S3: {exc}"
    return DatasetUnavailable(message, field="dataset_uri")


# --------------------------------------------------------------------------- hugging face hub


def _fetch_hf(location: _HfLocation, uri: str, options: SourceOptions) -> FetchedFile:
    """Download one file of a Hub dataset repo into the cache (offline: reuse an earlier copy)."""
    try:
        import huggingface_hub
    except ImportError:
        raise DatasetUnavailable("hf:// datasets need the huggingface_hub package installed",
                                 field="dataset_uri") from None
    final = _cache_path(uri, options)
    if _hf_offline():
        if final.is_file():
            return _fetch_local(final, uri, options.max_bytes)
        raise DatasetUnavailable(
            f"the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) and {uri} was never "
            "fetched before; unset HF_HUB_OFFLINE or use a local copy", field="dataset_uri")
    filename = location.filename or _single_jsonl_file(location, uri)
    final.parent.mkdir(parents=True, exist_ok=True)
    # hf_hub_download leaves .incomplete files behind on failure; a private folder that is always
    # removed keeps them out of the cache.
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=".partial-hf-"))
    try:
        kwargs: dict[str, Any] = dict(
            repo_id=location.repo_id, filename=filename, repo_type="dataset",
            revision=location.revision, cache_dir=scratch / "hub", local_dir=scratch / "files",
            endpoint=os.environ.get("HF_ENDPOINT") or None)
        try:
            info = huggingface_hub.hf_hub_download(**kwargs, dry_run=True)
            if info.file_size is not None:
                _check_size(info.file_size, options.max_bytes, uri)
            downloaded = Path(huggingface_hub.hf_hub_download(**kwargs))
        except Exception as exc:  # the hub raises many kinds; all mean unavailable
            if isinstance(exc, DatasetTooLarge):
                raise
            raise _hf_error(uri, exc) from None
        with downloaded.open("rb") as handle:
            chunks = iter(lambda: handle.read(CHUNK_BYTES), b"")
            return _download_to_cache(chunks, uri, options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _hf_offline() -> bool:
    """Whether the Hub must not be contacted (HF_HUB_OFFLINE, read now rather than at import)."""
    import huggingface_hub.constants as hf_constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(hf_constants.HF_HUB_OFFLINE)


def _single_jsonl_file(location: _HfLocation, uri: str) -> str:
    """The one .jsonl file of a repo whose URI names no path; DatasetRefused unless exactly one."""
    import huggingface_hub

    try:
        api = huggingface_hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        files = api.list_repo_files(location.repo_id, repo_type="dataset",
                                    revision=location.revision)
    except Exception as exc:  # see _fetch_hf
        raise _hf_error(uri, exc) from None
    candidates = sorted(f for f in files if f.endswith(".jsonl"))
    if len(candidates) != 1:
        raise DatasetRefused(
            f"{uri} holds {len(candidates)} .jsonl files; name one: {_HF_SYNTAX}",
            field="dataset_uri", details={"files": candidates[:20]})
    return candidates[0]


def _hf_error(uri: str, exc: Exception) -> DatasetUnavailable:
    """An actionable DatasetUnavailable for a Hub failure."""
    from huggingface_hub import errors

    name = type(exc).__name__
    if isinstance(exc, errors.OfflineModeIsEnabled):
        message = f"the Hugging Face Hub is offline (HF_HUB_OFFLINE is set); cannot fetch {uri}"
    elif isinstance(exc, errors.GatedRepoError):
        message = f"{uri} is gated; accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        message = f"{uri}: no such dataset repo, or it is private (set HF_TOKEN to read it)"
    elif isinstance(exc, errors.RevisionNotFoundError):
        message = f"{uri}: no such revision in the dataset repo"
    elif isinstance(exc, errors.RemoteEntryNotFoundError):
        message = f"{uri}: no such file in the dataset repo"
    elif isinstance(exc, errors.HfHubHTTPError):
        message = f"the Hugging Face Hub answered an error for {uri}: {exc}"
    else:
        # LocalEntryNotFoundError, httpx errors, OSError: the hub could not be reached.
        message = f"the Hugging Face Hub is unreachable, cannot fetch {uri} ({name}: {exc})"
    return DatasetUnavailable(message, field="dataset_uri", details={"error": name})
