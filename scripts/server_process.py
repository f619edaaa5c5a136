"""`alignloop serve` as a child process: used by the tests and the benchmarks (scripts/bench_*.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerProcess:
    """A running `alignloop serve` child: its URL, database and log."""

    url: str
    db_path: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        """The last 4,000 characters of its log."""
        return self.log_path.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | Path, workdir: Path, *, engine: str = "hf", serve_args: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout: float = 180.0, command: str = "serve") -> ServerProcess:
    """Start `alignloop serve` (or `demo`) on a free port with a fresh database in `workdir`; wait until its
    /healthz says ready."""
    port = free_port()
    db_path, log_path = workdir / "feedback.db", workdir / "server.log"
    cmd = [sys.executable, "-m", "chat_app.cli", command, "--base-model", str(model), "--engine", engine,
           "--db", str(db_path), "--port", str(port), *(serve_args or [])]
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(cmd, env=child_env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}/", db_path, log_path, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited during start-up; its log ends with:\n{server.log()}")
        try:  # /healthz answers 200 once the engine serves (503 while it loads)
            with urllib.request.urlopen(server.url + "healthz", timeout=5):
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"the app was not ready after {timeout:.0f} s; its log ends with:\n{server.log()}")


def stop_server(server: ServerProcess, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    server.process.terminate()
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
