"""Concurrent writers on one SQLite file, from threads and from processes: nothing lost."""

from __future__ import annotations

import multiprocessing as mp
import threading

from feedback_db import FeedbackStore, ModelRegistry, Reply

N_EACH = 40


def _setup(path) -> tuple[int, int, list[int]]:
    with FeedbackStore(path) as store:
        version = ModelRegistry(store).ensure_base_policy("tiny")
        return version.id


def _write_many(path, worker: int, version_id: int, n: int) -> list[int]:
    """One writer: its own conversation, replies, ratings and comparisons; returns the ids it was given."""
    with FeedbackStore(path) as store:
        user = store.ensure_user(f"user-{worker}")
        conv = store.create_conversation(user)
        acked = []
        for i in range(n):
            q = store.add_user_message(conv, user, f"question {i} from {worker}")
            a = store.add_reply(conv, user, q, "a", Reply(version_id))
            b = store.add_reply(conv, user, q, "b", Reply(version_id))
            acked.append(store.record_rating(user, a, 1, client_id=f"{worker}-r-{i}"))
            acked.append(store.record_comparison(user, a, b, "A", client_id=f"{worker}-c-{i}"))
        return acked


def _process_entry(path, worker, version_id, n, queue):
    queue.put(_write_many(path, worker, version_id, n))


def test_threads_share_one_store_without_losing_writes(tmp_path):
    path = tmp_path / "threads.db"
    version_id = _setup(path)
    with FeedbackStore(path) as store:
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def run(worker: int) -> None:
            try:
                user = store.ensure_user(f"t-{worker}")
                conv = store.create_conversation(user)
                ids = []
                for i in range(N_EACH):
                    q = store.add_user_message(conv, user, f"q{i}")
                    a = store.add_reply(conv, user, q, "a", Reply(version_id))
                    ids.append(store.record_rating(user, a, -1))
                results[worker] = ids
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        all_ids = [i for ids in results.values() for i in ids]
        assert len(set(all_ids)) == 6 * N_EACH
        assert store.db["ratings"].count == 6 * N_EACH
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_processes_write_concurrently_and_every_acknowledged_row_exists(tmp_path):
    path = tmp_path / "procs.db"
    version_id = _setup(path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_entry, args=(path, w, version_id, N_EACH, queue)) for w in range(4)]
    for p in procs:
        p.start()
    acked = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with FeedbackStore(path) as store:
        assert store.db["ratings"].count == 4 * N_EACH
        assert store.db["comparisons"].count == 4 * N_EACH
        rating_ids = {r["id"] for r in store.db["ratings"].rows}
        comparison_ids = {r["id"] for r in store.db["comparisons"].rows}
        for ids in acked:
            assert set(ids[0::2]) <= rating_ids and set(ids[1::2]) <= comparison_ids
        events = [r[0] for r in store.db.execute("SELECT id FROM events ORDER BY id")]
        assert events == list(range(1, len(events) + 1))  # one gap-free sequence
