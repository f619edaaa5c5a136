"""Opening the SQLite file, and the one way to write to it.

Writers queue on an advisory file lock (`<db>.lock`) before `BEGIN IMMEDIATE`.
SQLite's own busy handler sleeps in growing steps (up to 100 ms) while it polls, which
wrecks tail latency with several writer processes; a kernel file lock wakes the next
writer as soon as the previous one commits. The busy timeout stays as a safety net for
other tools (sqlite-utils CLI, datasette) writing to the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils


def default_db_path() -> Path:
    """`$ALIGNLOOP_DB`, else `~/.local/share/alignloop/feedback.db`."""
    env = os.environ.get("ALIGNLOOP_DB")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "alignloop" / "feedback.db"


@dataclass
class StoreConfig:
    """Settings of a feedback store."""

    busy_timeout_ms: int = 30_000  # how long SQLite waits on a lock held by another tool
    max_text_chars: int = 32_000  # longest message, comment or demonstration accepted
    max_comment_chars: int = 4_000  # longest free-text comment on a rating
    synchronous: str = "NORMAL"  # WAL + NORMAL: a commit survives a killed process (not a power cut)


def connect(path: Path, config: StoreConfig) -> sqlite_utils.Database:
    """Open `path` with WAL, foreign keys and a busy timeout; autocommit mode (we BEGIN explicitly)."""
    conn = sqlite3.connect(
        str(path), timeout=config.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    db = sqlite_utils.Database(conn, execute_plugins=False)
    conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {config.synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return db


class WriteLock:
    """Serialises writers across threads (a mutex) and processes (flock on `<db>.lock`)."""

    def __init__(self, db_path: Path) -> None:
        self._mutex = threading.Lock()
        self._lock_path = Path(str(db_path) + ".lock")
        self._fd: int | None = None
        self._pid = os.getpid()

    def _file(self) -> int:
        # A forked child must not share the parent's open file description:
        # flock would then count them as one holder.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database, lock: WriteLock) -> Iterator[sqlite_utils.Database]:
    """All-or-nothing write: take the lock, BEGIN IMMEDIATE, COMMIT or ROLLBACK.

    sqlite-utils calls inside the block nest as savepoints, so they join this transaction.
    """
    with lock.held():
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        db.execute("COMMIT")
