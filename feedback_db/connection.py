"""Opening the SQLite file, and the one way to write to it.

Writers queue on an advisory file lock (`<db>.lock`) before `BEGIN IMMEDIATE`.
SQLite's own busy handler sleeps in growing steps (up to 100 ms) while it polls, which
wrecks tail latency with several writer processes; the file lock is polled in steps of at
most `LOCK_POLL_MAX_S`. The busy timeout stays as a safety net for other tools (sqlite-utils
CLI, datasette) writing to the same file.

Every wait has a deadline (`StoreConfig.lock_timeout_s`): a writer that cannot get the lock
in time raises `StoreBusyError` with nothing written, instead of hanging a server behind an
import. A writer that waits announces it with a shared lock on `<db>.lock.wait`, so a long
job that commits in batches (an import) can let it in between two batches
(`WriteLock.let_waiters_in`): flock alone hands the lock to whoever asks first, which is
usually the job itself, immediately after it released it.

Whoever takes the lock writes who it is into `<db>.lock` (process id, command, thread, when), so a
writer that gives up can tell the operator who kept it waiting (`StoreBusyError.detail`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from .errors import StoreBusyError

LOCK_POLL_MAX_S = 0.002  # longest sleep between two tries of a busy write lock
HOLDER_RECORD_BYTES = 256  # the holder's record at the start of `<db>.lock`, padded to this size
# This process in the holder's record: the program and its subcommand words, never an option's value.
_COMMAND = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                     *[a for a in sys.argv[1:3] if not a.startswith("-")]])
BUSY_MESSAGE = ("The feedback database is busy (another process is writing, e.g. an import); "
                "try again in a few seconds.")


def default_db_path() -> Path:
    """`$ALIGNLOOP_DB`, else `~/.local/share/alignloop/feedback.db`."""
    env = os.environ.get("ALIGNLOOP_DB")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "alignloop" / "feedback.db"


@dataclass
class StoreConfig:
    """Settings of a feedback store."""

    busy_timeout_ms: int = 30_000  # how long SQLite waits on a lock held by another tool (reads)
    lock_timeout_s: float = 10.0  # longest wait for the write lock before StoreBusyError
    # Rows an import commits per transaction; the lock is free between them, and a chat's write waits at most one
    # batch: in the soak a 500-row batch took ~1.3 s (100 rows: ~0.27 s), and 100 cost 1.007x the import's time.
    import_batch_rows: int = 100
    max_system_prompt_chars: int = 4_000  # longest system prompt accepted (the chat UI's message limit)
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
    """Serialises writers across threads (a mutex) and processes (flock on `<db>.lock`).

    `held()` waits at most `timeout_s` (None: forever), then raises StoreBusyError.
    """

    def __init__(self, db_path: Path, timeout_s: float | None = None) -> None:
        self._mutex = threading.Lock()
        self._lock_path = Path(str(db_path) + ".lock")
        self._wait_path = Path(str(db_path) + ".lock.wait")
        self._fd: int | None = None
        self._pid = os.getpid()
        self._holder_thread: tuple[str, float] | None = None  # (thread name, since) of this process's holder
        self.timeout_s = timeout_s

    def _file(self) -> int:
        # A forked child must not share the parent's open file description:
        # flock would then count them as one holder.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def _announced(self) -> Iterator[None]:
        """While blocked: hold a shared lock on `<db>.lock.wait` (its own open file, so every
        waiting thread counts), which tells `let_waiters_in` that a writer is queued."""
        fd = os.open(self._wait_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the shared lock

    def _busy(self, waited: float, holder: str) -> StoreBusyError:
        return StoreBusyError(BUSY_MESSAGE, f"waited {waited:.1f} s for the write lock on {self._lock_path}; "
                                            f"held by {holder}")

    def _record_holder(self, fd: int) -> None:
        """Write who holds the lock now into its file (read by a writer that gives up)."""
        record = f"{os.getpid()}\t{_COMMAND}\t{threading.current_thread().name}\t{time.time():.3f}"
        os.pwrite(fd, record.encode("utf-8", "replace")[:HOLDER_RECORD_BYTES - 1].ljust(HOLDER_RECORD_BYTES - 1)
                  + b"\n", 0)

    def _holder_in_file(self, fd: int) -> str:
        """Who holds the lock by its file's record: 'pid 12 (alignloop db import), thread MainThread, for 3.1 s'."""
        try:
            pid, command, thread, since = os.pread(fd, HOLDER_RECORD_BYTES, 0).decode("utf-8", "replace").split("\t")
            return f"pid {pid} ({command}), thread {thread}, for {time.time() - float(since):.1f} s"
        except (OSError, ValueError):
            return "a writer that left no record (another tool, or an older alignloop)"

    def _holder_here(self) -> str:
        """Who holds the lock in this process (another thread, queued ahead on the mutex)."""
        held = self._holder_thread
        if held is None:
            return "another thread of this process"
        return f"this process (pid {os.getpid()}), thread {held[0]}, for {time.monotonic() - held[1]:.1f} s"

    def _acquire(self, deadline: float | None) -> None:
        """Take the mutex, then the file lock, before `deadline` (time.monotonic), or raise StoreBusyError."""
        start = time.monotonic()
        if not self._mutex.acquire(blocking=False):
            with self._announced():
                left = -1 if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._mutex.acquire(timeout=left):
                    raise self._busy(time.monotonic() - start, self._holder_here())
        self._holder_thread = (threading.current_thread().name, time.monotonic())
        try:
            fd = self._file()
            if not _try_flock(fd):
                with self._announced():
                    pause = 0.0001
                    while not _try_flock(fd):
                        now = time.monotonic()
                        if deadline is not None and now >= deadline:
                            raise self._busy(now - start, self._holder_in_file(fd))
                        time.sleep(pause if deadline is None else min(pause, deadline - now))
                        pause = min(pause * 2, LOCK_POLL_MAX_S)
            self._record_holder(fd)
        except BaseException:
            self._mutex.release()
            raise

    @contextlib.contextmanager
    def held(self, timeout_s: float | None = None) -> Iterator[float | None]:
        """Hold the lock; wait at most `timeout_s` (default: this lock's), then raise StoreBusyError.

        Yields the deadline (time.monotonic) the wait had, None for no deadline.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._acquire(deadline)
        try:
            yield deadline
        finally:
            fcntl.flock(self._file(), fcntl.LOCK_UN)
            self._mutex.release()

    def waiters(self) -> bool:
        """Whether some writer (this or another process) is queued for the lock right now."""
        fd = os.open(self._wait_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            return not _try_flock(fd)
        finally:
            os.close(fd)

    def let_waiters_in(self, max_wait_s: float = 1.0) -> None:
        """Between the batches of a long job (the lock not held): wait until the writers queued
        now have had their turn, at most `max_wait_s` (so a stream of writers cannot stall the job)."""
        deadline = time.monotonic() + max_wait_s
        while self.waiters() and time.monotonic() < deadline:
            time.sleep(LOCK_POLL_MAX_S / 2)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def _try_flock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without blocking; whether it was free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database, lock: WriteLock,
                      timeout_s: float | None = None) -> Iterator[sqlite_utils.Database]:
    """All-or-nothing write: take the lock, BEGIN IMMEDIATE, COMMIT or ROLLBACK.

    The whole wait (the lock, then SQLite's own lock, which another tool may hold) ends at
    one deadline, after which StoreBusyError is raised and nothing is written.
    sqlite-utils calls inside the block nest as savepoints, so they join this transaction.
    """
    with lock.held(timeout_s) as deadline:
        _begin_immediate(db, deadline)
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        db.execute("COMMIT")


def _begin_immediate(db: sqlite_utils.Database, deadline: float | None) -> None:
    """BEGIN IMMEDIATE, waiting on a lock of another tool only until `deadline`."""
    if deadline is None:
        db.execute("BEGIN IMMEDIATE")
        return
    (normal,) = db.execute("PRAGMA busy_timeout").fetchone()
    left_ms = max(0, int((deadline - time.monotonic()) * 1000))
    db.execute(f"PRAGMA busy_timeout = {min(int(normal), left_ms)}")
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise StoreBusyError(BUSY_MESSAGE, "another program holds SQLite's own write lock on the file "
                                           "(a tool that does not use alignloop's lock file)") from None
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(normal)}")
