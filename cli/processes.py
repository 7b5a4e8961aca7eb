"""Child processes of the `gralora` commands: start them, find a port, stop a whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

STOP_GRACE = 10.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gralora_command(*args: str) -> list[str]:
    """The `gralora` console script, run with this interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group a child leads (start_new_session=True)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_groups(processes: list[subprocess.Popen[bytes]],
                        grace: float = STOP_GRACE) -> None:
    """SIGTERM each group, wait up to `grace` seconds in all, then SIGKILL what is left.

    Whole groups, because a Celery worker's prefork children may outlive their parent.
    """
    for process in processes:
        if process.poll() is None:
            signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        signal_group(process, signal.SIGKILL)
        process.wait()


def stop_process_group(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """Stop one child and its whole group (see stop_process_groups)."""
    stop_process_groups([process], grace)
