"""The app on the tiny model, as a real `alignloop serve` subprocess, for gradio_client and browser tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from scripts.server_process import ServerProcess, start_server, stop_server

ADMIN_PASSWORD = "test-admin"
# The chat tab's settings inputs as a raw `fn_index` call sends them: system prompt, temperature, top-p,
# max new tokens, frequency penalty, min-p.
RAW_SAMPLING = ["", 0.0, 0.95, 8, 1.0, 0.1]

__all__ = ["ADMIN_PASSWORD", "RAW_SAMPLING", "ServerProcess", "count_rows", "fetch_rows", "start_test_server", "stop_server"]


def start_test_server(model_path: Path, workdir: Path) -> ServerProcess:
    """The transformers engine, short replies, no rate limits, a known admin password."""
    return start_server(model_path, workdir, engine="hf",
                        serve_args=["--max-new-tokens", "16", "--rate-limit", "0", "--new-ids-per-hour", "0",
                                    "--rounds-dir", str(workdir / "rounds")],
                        env={"ALIGNLOOP_CACHE": str(workdir / "cache"), "ALIGNLOOP_ADMIN_PASSWORD": ADMIN_PASSWORD})


def fetch_rows(db_path: Path, sql: str, params=()) -> list[tuple]:
    """A read-only query on the server's database, from a separate connection."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count_rows(db_path: Path, sql: str, params=()) -> int:
    """`SELECT COUNT(*) ...` on the server's database."""
    return fetch_rows(db_path, sql, params)[0][0]
