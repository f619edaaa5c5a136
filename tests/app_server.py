"""Run `alignloop serve` as a real subprocess on the tiny model, for gradio_client and browser tests."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ADMIN_PASSWORD = "test-admin"


@dataclass
class AppServer:
    url: str
    db_path: Path
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: Path, workdir: Path, *, extra_args: list[str] | None = None,
                 timeout: float = 180.0) -> AppServer:
    """Start the app with the transformers engine and wait until its engine is ready."""
    port = free_port()
    db_path = workdir / "feedback.db"
    log_path = workdir / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNLOOP_CACHE": str(workdir / "cache"),
           "ALIGNLOOP_ADMIN_PASSWORD": ADMIN_PASSWORD, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "chat_app.cli", "serve", "--base-model", str(model_path), "--engine", "hf",
           "--db", str(db_path), "--port", str(port), "--max-new-tokens", "16", "--rate-limit", "0",
           *(extra_args or [])]
    process = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", db_path, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        if "alignloop ready" in log_path.read_text(errors="replace"):
            try:
                urllib.request.urlopen(server.url, timeout=5)
                return server
            except OSError:
                pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log()}")


def stop_server(server: AppServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


def count_rows(db_path: Path, sql: str, params=()) -> int:
    """`SELECT COUNT(*) ...` on the server's database, from a separate connection."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()
