"""Dataset sources against real servers: local files, an HTTP server, moto S3 and a fake Hub."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gralora import netguard, sources
from gralora.errors import DatasetRefused, DatasetTooLarge, DatasetUnavailable
from gralora.pipeline import SourceOptions
from gralora.sources import FetchedFile, check_dataset_uri, fetch_dataset

BODY = b'{"text": "hello"}\n{"text": "world"}\n'
FLOOD_BYTES = 1 << 20  # what the flooding routes send; tests cap far below it
SMALL_CAP = 64 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_files(cache: Path) -> list[str]:
    """Everything in the cache folder, hidden partial files included."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --------------------------------------------------------------------------- the HTTP server


class DatasetServer(http.server.ThreadingHTTPServer):
    """A local server with one route per behaviour under test; it logs each request it gets."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), DatasetHandler)
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.release = threading.Event()  # lets the hanging route finish at teardown

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class DatasetHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /data.jsonl, /hops/<n>, redirects to refused targets, errors, floods, lies."""

    protocol_version = "HTTP/1.1"
    server: DatasetServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        port = self.server.server_address[1]
        path = self.path.split("?")[0]
        if path == "/data.jsonl":
            self._send(200, BODY)
        elif path.startswith("/hops/"):
            left = int(path.rsplit("/", 1)[1])
            if left == 0:
                self._send(200, BODY)
            else:
                self._redirect(f"/hops/{left - 1}")  # relative, as many servers send
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/to-loopback":
            self._redirect(f"http://127.0.0.2:{port}/data.jsonl")
        elif path == "/to-localhost":
            self._redirect(f"http://localhost:{port}/data.jsonl")
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif path == "/missing":
            self._send(404, b"not here")
        elif path == "/forbidden":
            self._send(403, b"no")
        elif path == "/error":
            self._send(500, b"boom")
        elif path == "/huge-header":
            self._huge_header()
        elif path == "/flood":
            self._flood(chunked=False)
        elif path == "/chunked-flood":
            self._flood(chunked=True)
        elif path == "/short":
            self._short()
        elif path == "/gzip-bomb":
            self._gzip_bomb()
        else:
            self._send(404, b"no route")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", {"Location": location})

    def _huge_header(self) -> None:
        """Announce a terabyte, then send nothing: only an up-front check ends this quickly."""
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.flush()
        self.server.release.wait(timeout=20)
        self.close_connection = True

    def _flood(self, *, chunked: bool) -> None:
        """Send FLOOD_BYTES with no Content-Length at all."""
        self.send_response(200)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"x" * 8192
        try:
            for _ in range(FLOOD_BYTES // len(chunk)):
                if chunked:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                else:
                    self.wfile.write(chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up once it had enough, as it should
        self.close_connection = True

    def _short(self) -> None:
        """Promise 1000 bytes, deliver 10, hang up."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.close_connection = True

    def _gzip_bomb(self) -> None:
        """A small gzip body that inflates to FLOOD_BYTES."""
        self._send(200, gzip.compress(b"\n" * FLOOD_BYTES), {"Content-Encoding": "gzip"})


@pytest.fixture(scope="module")
def server() -> Iterator[DatasetServer]:
    """The dataset server on a free port of 127.0.0.1."""
    srv = DatasetServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _private_ok(cache: Path, max_bytes: int = SMALL_CAP) -> SourceOptions:
    """Options as the CLI uses them: local addresses allowed."""
    return SourceOptions(cache_dir=cache, allow_private_urls=True, max_bytes=max_bytes)


def _service(cache: Path, max_bytes: int = SMALL_CAP) -> SourceOptions:
    """Options as the service uses them: only public addresses."""
    return SourceOptions(cache_dir=cache, allow_private_urls=False, max_bytes=max_bytes,
                         dataset_roots=[])


@pytest.fixture
def trust_test_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the service policy treat 127.0.0.1 and the name dataset.test as public.

    Only the address policy is replaced; every other host still goes through the real one.
    The .test names resolve nowhere, so fetching one proves the connection went to the pinned IP.
    """
    def resolve(host: str, port: int) -> list[str]:
        if host in ("127.0.0.1", "dataset.test", "wrong.test"):
            return ["127.0.0.1"]
        return netguard.resolve_public(host, port)

    monkeypatch.setattr(sources, "resolve_public", resolve)


# --------------------------------------------------------------------------- http: success


def test_http_fetch_writes_the_file_to_the_cache(server: DatasetServer, cache: Path) -> None:
    uri = f"{server.base}/data.jsonl"
    fetched = fetch_dataset(uri, _private_ok(cache))
    assert fetched == FetchedFile(path=cache / f"{_sha(uri.encode())}.jsonl", sha256=_sha(BODY),
                                  size_bytes=len(BODY), uri=uri)
    assert fetched.path.read_bytes() == BODY
    assert _cache_files(cache) == [fetched.path.name]


def test_http_refetch_replaces_the_cached_copy(server: DatasetServer, cache: Path) -> None:
    uri = f"{server.base}/data.jsonl"
    first = fetch_dataset(uri, _private_ok(cache))
    first.path.write_bytes(b"stale")
    assert fetch_dataset(uri, _private_ok(cache)).path.read_bytes() == BODY


def test_http_follows_five_redirects(server: DatasetServer, cache: Path) -> None:
    fetched = fetch_dataset(f"{server.base}/hops/5", _private_ok(cache))
    assert fetched.sha256 == _sha(BODY)
    assert fetched.uri == f"{server.base}/hops/5"  # the URI asked for, not the final one


def test_http_stops_after_five_redirects(server: DatasetServer, cache: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="more than 5 times"):
        fetch_dataset(f"{server.base}/hops/6", _private_ok(cache))
    with pytest.raises(DatasetUnavailable, match="more than 5 times"):
        fetch_dataset(f"{server.base}/loop", _private_ok(cache))
    assert _cache_files(cache) == []


def test_pinned_fetch_connects_to_the_checked_address(
        server: DatasetServer, cache: Path, trust_test_names: None) -> None:
    """dataset.test has no DNS entry: the fetch works only by connecting to the checked IP."""
    port = server.server_address[1]
    uri = f"http://dataset.test:{port}/data.jsonl?x=1"
    fetched = fetch_dataset(uri, _service(cache))
    assert fetched.sha256 == _sha(BODY)
    assert server.requests[-1] == ("/data.jsonl?x=1", f"dataset.test:{port}")


def test_pinned_fetch_follows_redirects(
        server: DatasetServer, cache: Path, trust_test_names: None) -> None:
    port = server.server_address[1]
    fetched = fetch_dataset(f"http://dataset.test:{port}/hops/2", _service(cache))
    assert fetched.sha256 == _sha(BODY)
    assert [host for _, host in server.requests[-3:]] == [f"dataset.test:{port}"] * 3


def _make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signs for dataset.test only: (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gralora test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dataset.test")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("dataset.test")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DatasetServer, Path]]:
    """The dataset server behind TLS with a dataset.test certificate; yields it and its CA."""
    import ssl

    ca, cert, key = _make_tls_files(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = DatasetServer()
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, ca
    srv.shutdown()
    srv.server_close()


def test_pinned_https_verifies_the_name_not_the_address(
        tls_server: tuple[DatasetServer, Path], cache: Path, trust_test_names: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Connecting to 127.0.0.1 with SNI dataset.test: the certificate is checked for the name."""
    srv, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    port = srv.server_address[1]
    fetched = fetch_dataset(f"https://dataset.test:{port}/data.jsonl", _service(cache))
    assert fetched.sha256 == _sha(BODY)
    assert srv.requests[-1] == ("/data.jsonl", f"dataset.test:{port}")


def test_pinned_https_refuses_a_certificate_for_another_name(
        tls_server: tuple[DatasetServer, Path], cache: Path, trust_test_names: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with pytest.raises(DatasetUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        fetch_dataset(f"https://wrong.test:{srv.server_address[1]}/data.jsonl", _service(cache))
    assert _cache_files(cache) == []


# --------------------------------------------------------------------------- http: refusals


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0x7f000001", "2130706433",
                                  "127.1", "[::1]", "[::ffff:127.0.0.1]", "169.254.169.254"])
def test_service_refuses_internal_hosts(server: DatasetServer, cache: Path, host: str) -> None:
    """Refused at the check and at the fetch, before anything is sent."""
    port = server.server_address[1]
    uri = f"http://{host}:{port}/data.jsonl"
    before = len(server.requests)
    with pytest.raises(DatasetRefused, match="not a public address"):
        check_dataset_uri(uri, _service(cache))
    with pytest.raises(DatasetRefused, match="not a public address"):
        fetch_dataset(uri, _service(cache))
    assert len(server.requests) == before
    assert _cache_files(cache) == []


@pytest.mark.parametrize(("route", "refused"), [
    ("/to-loopback", "127.0.0.2"), ("/to-localhost", "localhost"),
    ("/to-metadata", "169.254.169.254"),
])
def test_redirect_to_an_internal_address_is_refused(
        server: DatasetServer, cache: Path, trust_test_names: None, route: str,
        refused: str) -> None:
    """The first hop is allowed; the hop it redirects to is checked again and refused."""
    port = server.server_address[1]
    with pytest.raises(DatasetRefused, match=refused):
        fetch_dataset(f"http://dataset.test:{port}{route}", _service(cache))
    assert server.requests[-1][0] == route
    assert _cache_files(cache) == []


def test_redirect_to_another_scheme_is_refused(server: DatasetServer, cache: Path) -> None:
    with pytest.raises(DatasetRefused, match="'file' URL"):
        fetch_dataset(f"{server.base}/to-file", _private_ok(cache))


def test_credentials_in_the_url_are_refused(cache: Path) -> None:
    with pytest.raises(DatasetRefused, match="credentials"):
        check_dataset_uri("https://user:secret@example.com/data.jsonl", _private_ok(cache))


# --------------------------------------------------------------------------- http: failures


@pytest.mark.parametrize(("route", "status", "text"), [
    ("/missing", 404, "not found"), ("/forbidden", 403, "refused access"),
    ("/error", 500, "answered HTTP 500"),
])
def test_http_errors_are_unavailable(server: DatasetServer, cache: Path, route: str,
                                     status: int, text: str) -> None:
    with pytest.raises(DatasetUnavailable, match=text) as caught:
        fetch_dataset(f"{server.base}{route}?token=secret", _private_ok(cache))
    assert caught.value.details["status_code"] == status
    assert "127.0.0.1" in caught.value.message
    assert "secret" not in caught.value.message  # query strings may carry signatures
    assert _cache_files(cache) == []


def test_connection_refused_is_unavailable(cache: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="could not be reached"):
        fetch_dataset(f"http://127.0.0.1:{_free_port()}/data.jsonl", _private_ok(cache))


def test_announced_oversize_is_refused_before_the_body(server: DatasetServer,
                                                       cache: Path) -> None:
    """The route never sends its body, so only the Content-Length check can end this fast."""
    started = time.monotonic()
    with pytest.raises(DatasetTooLarge, match="limit"):
        fetch_dataset(f"{server.base}/huge-header", _private_ok(cache))
    assert time.monotonic() - started < 5
    assert _cache_files(cache) == []


@pytest.mark.parametrize("route", ["/flood", "/chunked-flood", "/gzip-bomb"])
def test_body_over_the_cap_is_cut_while_streaming(server: DatasetServer, cache: Path,
                                                  route: str) -> None:
    """No Content-Length (or a small compressed one): the cap counts the bytes as they come."""
    with pytest.raises(DatasetTooLarge) as caught:
        fetch_dataset(f"{server.base}{route}", _private_ok(cache, max_bytes=SMALL_CAP))
    assert caught.value.code == "dataset_too_large"
    assert _cache_files(cache) == []  # no partial file left behind


def test_flood_under_a_larger_cap_is_fetched(server: DatasetServer, cache: Path) -> None:
    """The same route passes when the cap allows it, so the cap is what stopped it above."""
    fetched = fetch_dataset(f"{server.base}/chunked-flood", _private_ok(cache, FLOOD_BYTES))
    assert fetched.size_bytes == FLOOD_BYTES


def test_body_shorter_than_announced_is_unavailable(server: DatasetServer, cache: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="broke off"):
        fetch_dataset(f"{server.base}/short", _private_ok(cache))
    assert _cache_files(cache) == []


# --------------------------------------------------------------------------- local files


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A dataset root holding data.jsonl and "my data.jsonl"; outside.jsonl lies beside it."""
    folder = tmp_path / "root"
    (folder / "sub").mkdir(parents=True)
    (folder / "data.jsonl").write_bytes(BODY)
    (folder / "my data.jsonl").write_bytes(BODY)
    (tmp_path / "outside.jsonl").write_bytes(b"secret\n")
    return folder


def _rooted(root: Path, max_bytes: int = SMALL_CAP) -> SourceOptions:
    return SourceOptions(cache_dir=root.parent / "cache", dataset_roots=[root],
                         allow_private_urls=False, max_bytes=max_bytes)


def test_file_under_the_root_is_used_in_place(root: Path) -> None:
    uri = (root / "data.jsonl").as_uri()
    fetched = fetch_dataset(uri, _rooted(root))
    assert fetched == FetchedFile(path=root / "data.jsonl", sha256=_sha(BODY),
                                  size_bytes=len(BODY), uri=uri)
    assert not (root.parent / "cache").exists()  # nothing copied


def test_percent_encoded_file_uri_is_decoded(root: Path) -> None:
    uri = f"file://localhost{root}/my%20data.jsonl"
    assert fetch_dataset(uri, _rooted(root)).path == root / "my data.jsonl"


def test_plain_paths_work_without_roots(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    assert fetch_dataset("data.jsonl", _private_ok(root / "c")).path == root / "data.jsonl"
    outside = str(root.parent / "outside.jsonl")
    assert fetch_dataset(outside, _private_ok(root / "c")).sha256 == _sha(b"secret\n")


def test_plain_paths_are_refused_with_roots(root: Path) -> None:
    with pytest.raises(DatasetRefused, match="file:///"):
        check_dataset_uri(str(root / "data.jsonl"), _rooted(root))


@pytest.mark.parametrize("relative", [
    "../outside.jsonl",
    "sub/../data.jsonl",  # lands inside the root, still refused: '..' is never accepted
    "sub/%2e%2e/data.jsonl",
    "sub/%2E%2E/%2e%2e/outside.jsonl",
])
def test_dot_dot_is_refused(root: Path, relative: str) -> None:
    with pytest.raises(DatasetRefused, match=r"'\.\.' is not allowed"):
        check_dataset_uri(f"file://{root}/{relative}", _rooted(root))


def test_file_outside_the_root_is_refused(root: Path) -> None:
    with pytest.raises(DatasetRefused, match="not inside an allowed dataset folder"):
        fetch_dataset((root.parent / "outside.jsonl").as_uri(), _rooted(root))


def test_missing_file_outside_the_root_is_refused_not_unavailable(root: Path) -> None:
    """Existence of files outside the roots is not revealed."""
    with pytest.raises(DatasetRefused):
        check_dataset_uri((root.parent / "nope.jsonl").as_uri(), _rooted(root))


def test_symlink_escaping_the_root_is_refused(root: Path) -> None:
    (root / "link.jsonl").symlink_to(root.parent / "outside.jsonl")
    (root / "sub" / "dir-link").symlink_to(root.parent)
    with pytest.raises(DatasetRefused, match="not inside"):
        check_dataset_uri((root / "link.jsonl").as_uri(), _rooted(root))
    with pytest.raises(DatasetRefused, match="not inside"):
        fetch_dataset((root / "sub" / "dir-link" / "outside.jsonl").as_uri(), _rooted(root))


def test_symlink_inside_the_root_is_followed(root: Path) -> None:
    (root / "sub" / "alias.jsonl").symlink_to(root / "data.jsonl")
    fetched = fetch_dataset((root / "sub" / "alias.jsonl").as_uri(), _rooted(root))
    assert fetched.path == root / "data.jsonl" and fetched.sha256 == _sha(BODY)


def test_missing_file_under_the_root_is_unavailable(root: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        check_dataset_uri((root / "nope.jsonl").as_uri(), _rooted(root))


def test_folders_and_devices_are_refused(root: Path) -> None:
    with pytest.raises(DatasetRefused, match="not a regular file"):
        check_dataset_uri((root / "sub").as_uri(), _rooted(root))
    with pytest.raises(DatasetRefused, match="not a regular file"):
        fetch_dataset("/dev/zero", _private_ok(root / "c"))  # would never end


def test_local_file_over_the_cap_is_too_large(root: Path) -> None:
    with pytest.raises(DatasetTooLarge):
        fetch_dataset((root / "data.jsonl").as_uri(), _rooted(root, max_bytes=len(BODY) - 1))
    assert fetch_dataset((root / "data.jsonl").as_uri(), _rooted(root, len(BODY))).size_bytes


@pytest.mark.parametrize("uri", ["file://other-host/data.jsonl", "file:///data.jsonl?x",
                                 "file:///data%00.jsonl", "file:///bad%ff.jsonl"])
def test_malformed_file_uris_are_refused(root: Path, uri: str) -> None:
    with pytest.raises(DatasetRefused):
        check_dataset_uri(uri, _private_ok(root / "c"))


# --------------------------------------------------------------------------- scheme and syntax


@pytest.mark.parametrize("uri", ["ftp://example.com/data.jsonl", "gopher://x/", "data:,hi",
                                 "javascript:alert(1)", "ssh://host/file", "HDFS://nn/x"])
def test_unknown_schemes_are_refused_naming_the_allowed_ones(cache: Path, uri: str) -> None:
    with pytest.raises(DatasetRefused) as caught:
        check_dataset_uri(uri, _private_ok(cache))
    for scheme in ("file://", "http://", "https://", "s3://", "hf://"):
        assert scheme in caught.value.message


@pytest.mark.parametrize("uri", ["", "http://example.com/a\nb", "x" * 5000])
def test_empty_control_characters_and_overlong_uris_are_refused(cache: Path, uri: str) -> None:
    with pytest.raises(DatasetRefused):
        check_dataset_uri(uri, _private_ok(cache))


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "s3:///key", "s3:bucket/key",
                                 "s3://Bad_Bucket/key", "s3://192.168.0.1/key", "s3://ab/key"])
def test_malformed_s3_uris_are_refused(cache: Path, uri: str) -> None:
    with pytest.raises(DatasetRefused):
        check_dataset_uri(uri, _private_ok(cache))


def test_s3_bucket_allowlist(cache: Path) -> None:
    check_dataset_uri("s3://datasets-ok/a/b.jsonl", _private_ok(cache), s3_buckets={"datasets-ok"})
    with pytest.raises(DatasetRefused, match="other-bucket"):
        check_dataset_uri("s3://other-bucket/a.jsonl", _private_ok(cache),
                          s3_buckets={"datasets-ok"})


@pytest.mark.parametrize("uri", [
    "hf://datasets/org/name", "hf://datasets/org/name/train.jsonl",
    "hf://datasets/org/name@main/data/train.jsonl", "hf://datasets/org/name@refs%2Fpr%2F1",
    "hf://datasets/my-org/my.data_set@0123456789abcdef0123456789abcdef01234567/x.jsonl",
])
def test_valid_hf_uris_pass_the_check(cache: Path, uri: str) -> None:
    check_dataset_uri(uri, _service(cache))


@pytest.mark.parametrize("uri", [
    "hf://models/org/name/x.jsonl", "hf://datasets/org", "hf://datasets//name",
    "hf://datasets/org/name@", "hf://datasets/org/name/../../x", "hf://datasets/org/na me/x",
    "hf://datasets/org/name@refs%2F..%2Fx", "hf:datasets/org/name", "hf://datasets/org/name//x",
])
def test_malformed_hf_uris_are_refused(cache: Path, uri: str) -> None:
    with pytest.raises(DatasetRefused):
        check_dataset_uri(uri, _service(cache))


# --------------------------------------------------------------------------- s3 (moto server)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in this process, on a free port."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    yield f"http://127.0.0.1:{port}"
    moto.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def bucket(s3_endpoint: str, aws_env: None, request: pytest.FixtureRequest) -> str:
    """A fresh bucket holding data.jsonl and a 2000-byte big.jsonl."""
    import boto3

    name = f"ds-{abs(hash(request.node.nodeid)) % 10**12}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="sets/data.jsonl", Body=BODY)
    client.put_object(Bucket=name, Key="big.jsonl", Body=b"y" * 2000)
    return name


def _s3_options(cache: Path, endpoint: str, max_bytes: int = SMALL_CAP) -> SourceOptions:
    return SourceOptions(cache_dir=cache, allow_private_urls=False, max_bytes=max_bytes,
                         s3_endpoint_url=endpoint, dataset_roots=[])


def test_s3_fetch(bucket: str, s3_endpoint: str, cache: Path) -> None:
    uri = f"s3://{bucket}/sets/data.jsonl"
    fetched = fetch_dataset(uri, _s3_options(cache, s3_endpoint), s3_buckets={bucket})
    assert fetched == FetchedFile(path=cache / f"{_sha(uri.encode())}.jsonl", sha256=_sha(BODY),
                                  size_bytes=len(BODY), uri=uri)
    assert fetched.path.read_bytes() == BODY
    assert _cache_files(cache) == [fetched.path.name]


def test_s3_missing_key(bucket: str, s3_endpoint: str, cache: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        fetch_dataset(f"s3://{bucket}/nope.jsonl", _s3_options(cache, s3_endpoint))
    assert _cache_files(cache) == []


def test_s3_missing_bucket(s3_endpoint: str, aws_env: None, cache: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        fetch_dataset("s3://no-such-bucket-here/a.jsonl", _s3_options(cache, s3_endpoint))


def test_s3_oversize(bucket: str, s3_endpoint: str, cache: Path) -> None:
    with pytest.raises(DatasetTooLarge):
        fetch_dataset(f"s3://{bucket}/big.jsonl", _s3_options(cache, s3_endpoint, 1999))
    assert _cache_files(cache) == []
    assert fetch_dataset(f"s3://{bucket}/big.jsonl",
                         _s3_options(cache, s3_endpoint, 2000)).size_bytes == 2000


def test_s3_without_credentials(s3_endpoint: str, cache: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(DatasetUnavailable, match="no AWS credentials"):
        fetch_dataset("s3://some-bucket/a.jsonl", _s3_options(cache, s3_endpoint))


def test_s3_unreachable_endpoint(aws_env: None, cache: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="could not read"):
        fetch_dataset("s3://some-bucket/a.jsonl",
                      _s3_options(cache, f"http://127.0.0.1:{_free_port()}"))


# --------------------------------------------------------------------------- hf (a fake Hub)

HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    """Answers the Hub's /resolve/ route for train.jsonl in datasets/org/name only."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        if self.path.startswith("/datasets/org/name/resolve/main/train.jsonl"):
            headers = {"X-Repo-Commit": HF_COMMIT, "ETag": f'"{_sha(BODY)[:20]}"'}
            status, body = 200, BODY
        elif self.path.startswith("/datasets/org/name/resolve/"):
            headers, status, body = {"X-Error-Code": "EntryNotFound"}, 404, b"no such entry"
        else:
            headers, status, body = {"X-Error-Code": "RepoNotFound"}, 404, b"no such repo"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)


@pytest.fixture(scope="module")
def hub_endpoint() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def online_hub(hub_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was set when huggingface_hub was imported")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub_endpoint)
    return hub_endpoint


def test_hf_fetch(online_hub: str, cache: Path) -> None:
    uri = "hf://datasets/org/name/train.jsonl"
    fetched = fetch_dataset(uri, _service(cache))
    assert fetched == FetchedFile(path=cache / f"{_sha(uri.encode())}.jsonl", sha256=_sha(BODY),
                                  size_bytes=len(BODY), uri=uri)
    assert _cache_files(cache) == [fetched.path.name]  # hub scratch folders are gone


def test_hf_oversize(online_hub: str, cache: Path) -> None:
    with pytest.raises(DatasetTooLarge):
        fetch_dataset("hf://datasets/org/name/train.jsonl", _service(cache, len(BODY) - 1))
    assert _cache_files(cache) == []


@pytest.mark.parametrize(("uri", "text"), [
    ("hf://datasets/org/name/other.jsonl", "no such file"),
    ("hf://datasets/org/missing/train.jsonl", "no such dataset repo"),
])
def test_hf_missing(online_hub: str, cache: Path, uri: str, text: str) -> None:
    with pytest.raises(DatasetUnavailable, match=text):
        fetch_dataset(uri, _service(cache))
    assert _cache_files(cache) == []


def test_hf_offline_without_a_copy(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(DatasetUnavailable, match="offline") as caught:
        fetch_dataset("hf://datasets/org/name/train.jsonl", _service(cache))
    assert caught.value.code == "dataset_unavailable"


def test_hf_offline_reuses_an_earlier_copy(online_hub: str, cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "hf://datasets/org/name/train.jsonl"
    online = fetch_dataset(uri, _service(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    assert fetch_dataset(uri, _service(cache)) == online
