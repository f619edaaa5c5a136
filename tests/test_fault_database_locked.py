"""Fault test: another process holds the database's write lock (a long import, a stuck tool). The
server keeps answering everything that does not write, a write waits at most the store's deadline and
then says "busy, try again", and once the lock is free, writes go through again."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from feedback_db import FeedbackStore, StoreConfig
from tests.app_server import RAW_SAMPLING as SAMPLING, count_rows
from scripts.raw_gradio import RawGradio



def _hold_write_lock(db_path: str, held, release) -> None:
    """In another process: take the store's write lock (file lock + BEGIN IMMEDIATE) until told to let go."""
    store = FeedbackStore(db_path)
    with store.transaction():
        held.set()
        release.wait(120)
    store.close()


def test_a_locked_database_delays_writes_only_and_says_busy(app_server) -> None:
    raw = RawGradio(app_server.url)
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_write_lock, args=(str(app_server.db_path), held, release))
    holder.start()
    try:
        assert held.wait(60)
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            blocked = pool.submit(raw.call, raw.fn_index("chat"), ["while locked", [], None, *SAMPLING, None],
                                  raw.new_session())
            time.sleep(1.0)
            # While the chat waits for the lock, the event loop is free: reads and other pages answer at once.
            for _ in range(3):
                t0 = time.monotonic()
                assert httpx.get(app_server.url + "healthz", timeout=5).status_code == 200
                assert raw.http.get(app_server.url + "config").status_code == 200
                assert time.monotonic() - t0 < 2.0
            outcome = blocked.result(timeout=60)
            waited = time.monotonic() - started
        deadline = StoreConfig().lock_timeout_s
        assert not outcome.success and "busy" in outcome.error, outcome.error
        assert deadline - 1 <= waited <= deadline + 15
    finally:
        release.set()
        holder.join(30)
        raw.close()
    assert count_rows(app_server.db_path, "SELECT COUNT(*) FROM messages WHERE content = 'while locked'") == 0
    after = RawGradio(app_server.url)
    try:
        assert after.call(after.fn_index("chat"), ["after the lock", [], None, *SAMPLING, None],
                          after.new_session()).success
    finally:
        after.close()
