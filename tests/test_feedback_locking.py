"""Write-lock deadlines and batched imports: a busy database says so, an import lets writers in.

Issue #10 row 3: a 50k-row import held the write lock for minutes and every writer waited.
"""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading
import time

import pytest

from feedback_db import FeedbackStore, ModelRegistry, Reply, StoreBusyError, StoreConfig, for_operator, import_rows
from feedback_db.connection import BUSY_MESSAGE

SPAWN = mp.get_context("spawn")  # a fresh interpreter: no lock or connection inherited from the test


def _hold_write_lock(path, ready, release) -> None:
    """Another process in the middle of a long write (e.g. an import's transaction)."""
    with FeedbackStore(path) as store, store.transaction():
        ready.set()
        release.wait(60)


def _rated_reply(store: FeedbackStore) -> tuple[str, int]:
    version = ModelRegistry(store).ensure_base_policy("tiny")
    user = store.ensure_user("writer")
    conv = store.create_conversation(user)
    q = store.add_user_message(conv, user, "Hello?")
    return user, store.add_reply(conv, user, q, "Hi.", Reply(version.id))


def test_a_write_gives_up_at_the_deadline_when_another_process_holds_the_lock(tmp_db_path):
    with FeedbackStore(tmp_db_path, StoreConfig(lock_timeout_s=0.5)) as store:
        user, reply = _rated_reply(store)
        before = store.snapshot()
        ready, release = SPAWN.Event(), SPAWN.Event()
        holder = SPAWN.Process(target=_hold_write_lock, args=(tmp_db_path, ready, release))
        holder.start()
        try:
            assert ready.wait(60), "the lock holder did not start"
            start = time.monotonic()
            with pytest.raises(StoreBusyError, match="The feedback database is busy .* try again in a few seconds") as busy:
                store.record_rating(user, reply, 1)
            waited = time.monotonic() - start
            # A user reads only what to do; the operator's detail names the lock file and who held it, for how long.
            assert str(busy.value) == BUSY_MESSAGE and str(tmp_db_path) not in str(busy.value)
            detail = busy.value.detail
            assert f"{tmp_db_path}.lock" in detail and f"held by pid {holder.pid} (" in detail, detail
            assert "thread MainThread, for " in detail and for_operator(busy.value) == f"{BUSY_MESSAGE} ({detail})"
            assert 0.4 <= waited < 0.5 + 2.0  # the deadline, plus a margin for a loaded machine
            assert store.snapshot() == before and store.db["ratings"].count == 0
        finally:
            release.set()
            holder.join(30)
        assert holder.exitcode == 0
        store.record_rating(user, reply, 1)  # the lock is free again: the same write goes through
        assert store.db["ratings"].count == 1


def test_a_write_gives_up_when_another_tool_holds_sqlites_lock(tmp_db_path):
    """A tool that skips our file lock (sqlite-utils, datasette) holds SQLite's own write lock."""
    with FeedbackStore(tmp_db_path, StoreConfig(lock_timeout_s=0.3)) as store:
        user, reply = _rated_reply(store)
        other = sqlite3.connect(tmp_db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(StoreBusyError, match="busy"):
                store.record_rating(user, reply, -1)
            assert time.monotonic() - start < 0.3 + 2.0
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert store.db["ratings"].count == 0
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == StoreConfig().busy_timeout_ms
        store.record_rating(user, reply, -1)


def test_a_thread_of_the_same_process_also_has_a_deadline(tmp_db_path):
    with FeedbackStore(tmp_db_path, StoreConfig(lock_timeout_s=0.3)) as store:
        user, reply = _rated_reply(store)
        inside, release = threading.Event(), threading.Event()

        def hold() -> None:
            with store.transaction():
                inside.set()
                release.wait(30)

        holder = threading.Thread(target=hold, name="slow-writer")
        holder.start()
        try:
            assert inside.wait(10)
            with pytest.raises(StoreBusyError) as busy:
                store.record_rating(user, reply, 1)
            assert "held by this process" in busy.value.detail and "thread slow-writer, for " in busy.value.detail
        finally:
            release.set()
            holder.join()
        assert store.db["ratings"].count == 0


def _write_during_import(path, reply, go, started, out) -> None:
    """A chat user rating a reply while the import runs; reports the rating's event id."""
    with FeedbackStore(path) as store:
        assert go.wait(120)
        started.set()
        rating = store.record_rating("writer", reply, 1)
        out.put(store.db.execute("SELECT event_id FROM ratings WHERE id = ?", [rating]).fetchone()[0])


def test_an_import_commits_in_batches_and_lets_a_concurrent_writer_in(tmp_db_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(2000)]
    with FeedbackStore(tmp_db_path) as store:
        _, reply = _rated_reply(store)
        go, started, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        writer = SPAWN.Process(target=_write_during_import, args=(tmp_db_path, reply, go, started, out))
        writer.start()
        batches: list[tuple[int, int]] = []

        def progress(done: int, total: int) -> None:
            batches.append((done, total))
            if len(batches) == 1:  # the import is under way: the writer starts now
                go.set()
                assert started.wait(120), "the writer did not start"

        try:
            result = import_rows(store, rows, "preferences", source="big", batch_rows=100, progress=progress)
            rating_event = out.get(timeout=120)
        finally:
            go.set()
            writer.join(60)
        assert writer.exitcode == 0
        assert result.rows == 2000 and result.new_records == 2000 * 4  # user turn, 2 replies, 1 comparison
        assert batches == [(n, 2000) for n in range(100, 2001, 100)]
        # Ordering, not wall-clock: the writer's rating landed between the import's batches,
        # with most of the import still to come (one transaction would put it after all of them).
        import_events = [r[0] for r in store.db.execute(
            "SELECT event_id FROM messages WHERE user_id = 'importer'"
            " UNION ALL SELECT event_id FROM comparisons WHERE user_id = 'importer'")]
        assert len(import_events) == result.new_records
        after = sum(1 for e in import_events if e > rating_event)
        assert after >= len(import_events) // 2, f"the writer waited for {len(import_events) - after} import events"
        # The count of new records is the import's own, not the writer's rating.
        again = import_rows(store, rows, "preferences", source="big", batch_rows=700)
        assert again.new_records == 0


def test_an_import_inside_a_transaction_is_still_all_or_nothing(tmp_db_path):
    rows = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    with FeedbackStore(tmp_db_path) as store:
        with pytest.raises(RuntimeError), store.transaction():
            import_rows(store, rows, "preferences", source="t", batch_rows=2)
            raise RuntimeError("the caller's transaction fails after the import")
        assert store.db["comparisons"].count == 0 and store.db["messages"].count == 0
