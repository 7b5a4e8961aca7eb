"""Service commands: api, worker, migrate, serve, create-key, keys."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Seconds `serve` waits for the API to answer /healthz, and for children to stop on Ctrl-C.
SERVE_START_TIMEOUT = 120.0
SERVE_STOP_GRACE = 10.0
LOCAL_KEY_FILE = "api-key"
LOCAL_KEY_OWNER = "local"


def register(subparsers: Any) -> None:
    """Add the service subcommands to the `gralora` parser."""
    api = subparsers.add_parser("api", help="run the REST API (uvicorn)")
    api.add_argument("--host", default=None, help="bind address (default GRALORA_API_HOST)")
    api.add_argument("--port", type=int, default=None, help="port (default GRALORA_API_PORT)")
    api.set_defaults(handler=_api)

    worker = subparsers.add_parser("worker", help="run a Celery worker that trains jobs")
    worker.add_argument("--queue", default=None, help="queue to consume (default GRALORA_QUEUE)")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="jobs at once (default 1: one job per GPU)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=_worker)

    migrate = subparsers.add_parser("migrate", help="upgrade the database to the newest schema")
    migrate.set_defaults(handler=_migrate)

    serve = subparsers.add_parser(
        "serve", help="run the API and one worker on this machine (embedded defaults: SQLite)")
    serve.add_argument("--host", default=None, help="bind address (default GRALORA_API_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default GRALORA_API_PORT)")
    serve.set_defaults(handler=_serve)

    create_key = subparsers.add_parser(
        "create-key", help="create an API key; the key is the last line of the output")
    create_key.add_argument("--owner", required=True)
    create_key.set_defaults(handler=_keys_create)

    keys = subparsers.add_parser("keys", help="create, list or revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_create = keys_sub.add_parser("create", help="create a key (printed last, once)")
    keys_create.add_argument("--owner", required=True)
    keys_create.set_defaults(handler=_keys_create)
    keys_list = keys_sub.add_parser("list", help="list keys (prefixes only, never the key)")
    keys_list.add_argument("--owner", default=None)
    keys_list.set_defaults(handler=_keys_list)
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a key by id or prefix")
    target = keys_revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", dest="key_id")
    target.add_argument("--prefix")
    keys_revoke.set_defaults(handler=_keys_revoke)


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.settings import get_settings

    settings = get_settings()
    uvicorn.run("api.app:create_app", factory=True, host=args.host or settings.api_host,
                port=args.port or settings.api_port)
    return 0


def worker_argv(queue: str, concurrency: int, loglevel: str, broker_url: str) -> list[str]:
    """Arguments for `celery worker`: prefork, one job per child, the given queue."""
    argv = ["worker", "--pool", "prefork", "--concurrency", str(concurrency),
            "--queues", queue, "--loglevel", loglevel,
            # A unique node name, so several workers can share a host.
            "--hostname", f"gralora-{os.getpid()}@%h"]
    if not broker_url.startswith(("redis://", "rediss://", "amqp://", "amqps://")):
        # Server-less transports have no fanout exchange for worker-to-worker chatter.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


def _worker(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    settings = get_settings()
    from worker.celery_app import app

    if not settings.resolved_broker_url.startswith(("redis://", "rediss://", "amqp")):
        app.conf.worker_enable_remote_control = False
    app.worker_main(worker_argv(args.queue or settings.queue, args.concurrency, args.loglevel,
                                settings.resolved_broker_url))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from service.schema import current_revision, upgrade_to_head

    upgrade_to_head()
    print(f"database at revision {current_revision()}")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.keys import create_key

    try:
        with session_scope() as session:
            plaintext, key = create_key(session, owner=args.owner)
            key_id, owner = key.id, key.owner
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created API key {key_id} for owner {owner!r}; it is shown once, store it now:")
    print(plaintext)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.keys import list_keys

    with session_scope() as session:
        rows = [(str(k.id), k.prefix, k.owner, k.created_at.isoformat(timespec="seconds"),
                 k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-")
                for k in list_keys(session, owner=args.owner)]
    header = ("id", "prefix", "owner", "created_at", "revoked_at")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.errors import KeyNotFound
    from service.keys import revoke_key

    try:
        with session_scope() as session:
            key = revoke_key(session, key_id=args.key_id, prefix=args.prefix)
            key_id, prefix = key.id, key.prefix
    except KeyNotFound as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"revoked API key {key_id} ({prefix}...)")
    return 0


def local_api_key(data_dir: Path) -> str:
    """The embedded mode's key: reused from data_dir while it is valid, else a new one."""
    from service.db import session_scope
    from service.keys import authenticate, create_key

    key_file = data_dir / LOCAL_KEY_FILE
    with session_scope() as session:
        if key_file.is_file():
            saved = key_file.read_text().strip()
            if authenticate(session, saved) is not None:
                return saved
        plaintext, _ = create_key(session, owner=LOCAL_KEY_OWNER)
    # Only the plaintext file lets `serve` show the same key again; readable by this user only.
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(plaintext + "\n")
    return plaintext


def _wait_healthy(url: str, children: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    """Poll `url` until it answers 200; False if it does not in time or a child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _serve(args: argparse.Namespace) -> int:
    from cli.processes import stop_process_groups
    from service.db import reset_caches
    from service.schema import upgrade_to_head
    from service.settings import get_settings

    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for folder in (settings.resolved_model_roots[0], data_dir / "datasets"):
        folder.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    key = local_api_key(data_dir)
    reset_caches()  # the children open their own connections

    host = args.host or settings.api_host
    port = args.port or settings.api_port
    # Same commands as production; only the defaulted URLs differ. An absolute data dir keeps
    # the children on the same files whatever their working directory.
    env = {**os.environ, "GRALORA_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "cli.main"]
    commands = {"api": ["api", "--host", host, "--port", str(port)],
                "worker": ["worker", "--concurrency", "1"]}
    named = {name: subprocess.Popen([*cli, *command], env=env, start_new_session=True)
             for name, command in commands.items()}
    children = list(named.values())
    stopping = False

    def request_stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if not _wait_healthy(f"{url}/healthz", children, SERVE_START_TIMEOUT):
            if not stopping:
                print("error: the API did not start; see the output above", file=sys.stderr)
            return 0 if stopping else 1
        print(f"GraLoRA service running (data in {data_dir}); Ctrl-C stops it.", flush=True)
        print(f"Model folders go under {settings.resolved_model_roots[0]}, datasets under "
              f"{data_dir / 'datasets'} or ./examples.", flush=True)
        print(f"URL: {url}", flush=True)
        print(f"API key: {key}", flush=True)
        while not stopping:
            for name, child in named.items():
                if child.poll() is not None:
                    print(f"error: the {name} process exited with status {child.returncode}",
                          file=sys.stderr)
                    return 1
            time.sleep(0.3)
        print("stopping...", flush=True)
        return 0
    finally:
        stop_process_groups(children, SERVE_STOP_GRACE)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
