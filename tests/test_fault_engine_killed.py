"""Fault test: vLLM's engine process is killed under a running server. The server must not limp on
storing empty error replies: /healthz turns unready, and the process exits with status 3 so that a
supervisor restarts it."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest

from chat_app.app import ENGINE_GONE_EXIT_STATUS
from scripts.server_process import start_server, stop_server


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.vllm
def test_the_server_exits_when_the_engine_process_dies(tiny_model_path, tmp_path) -> None:
    pytest.importorskip("vllm")
    server = start_server(tiny_model_path, tmp_path, engine="vllm", timeout=400,
                          serve_args=["--max-new-tokens", "8", "--rate-limit", "0", "--max-model-len", "256"],
                          env={"ALIGNLOOP_CACHE": str(tmp_path / "cache")})
    try:
        health = httpx.get(server.url + "healthz", timeout=10)
        assert health.status_code == 200 and health.json()["engine"] == "vllm"
        engine_processes = _children(server.process.pid)
        assert engine_processes, "vLLM's engine process was not found among the server's children"
        for pid in engine_processes:
            os.kill(pid, signal.SIGKILL)
        returncode = server.process.wait(timeout=90)
        assert returncode == ENGINE_GONE_EXIT_STATUS, server.log()
        assert "the model engine is gone" in server.log()
    finally:
        if server.process.poll() is None:
            stop_server(server)
