"""Registry races (issue #10 row 11): concurrent promotes, rollbacks, retirements, metric updates
and round finishes, from threads and from processes, keep exactly one live version per kind and
lose no metric update; the database itself refuses a second live version."""

from __future__ import annotations

import multiprocessing as mp
import random
import sqlite3
import threading

import pytest
import sqlite_utils

from feedback_db import FeedbackStore, ModelRegistry, RegistryError
from feedback_db.schema import migrate

SPAWN = mp.get_context("spawn")
ITERATIONS = 25


def _setup(path) -> tuple[int, int]:
    """Policy and reward versions (one live of each), a version whose metrics everyone updates, and a round."""
    with FeedbackStore(path) as store:
        reg = ModelRegistry(store)
        for kind in ("policy", "reward"):
            for i in range(4):
                reg.register(f"{kind}-{i}", kind=kind, adapter_path=f"/{kind}/{i}", base_model="tiny")
            reg.promote(f"{kind}-0")
        target = reg.register("metrics-target", kind="policy", base_model="tiny", metrics={"seed": 1})
        round_id = reg.start_round({"n": 1}).id
        return target.id, round_id


def _churn(path, worker: int, target_id: int, round_id: int, store: FeedbackStore | None = None,
           go=None) -> None:
    """One operator (or server) doing everything the registry offers, in a random order."""
    own = store is None
    store = store or FeedbackStore(path)
    if go is not None:
        go.wait(60)  # a barrier: every process starts churning at once
    try:
        reg = ModelRegistry(store)
        rng = random.Random(worker)
        for i in range(ITERATIONS):
            kind = rng.choice(("policy", "reward"))
            name = f"{kind}-{rng.randrange(4)}"
            action = rng.choice(("promote", "rollback", "retire"))
            try:
                if action == "promote":
                    reg.promote(name, actor=f"w{worker}")
                elif action == "rollback":
                    reg.rollback(kind, actor=f"w{worker}")
                else:
                    reg.retire(name, actor=f"w{worker}")
            except RegistryError:
                pass  # already live, nothing to roll back to, or live: refused, nothing written
            reg.update_metrics(target_id, {f"w{worker}-{i}": i})
            reg.finish_round(round_id, "succeeded", metrics={f"w{worker}-{i}": i})
    finally:
        if own:
            store.close()


def _check(path, workers: int) -> None:
    with FeedbackStore(path) as store:
        reg = ModelRegistry(store)
        for kind in ("policy", "reward"):
            live = store.db.execute(
                "SELECT COUNT(*) FROM model_versions WHERE kind = ? AND status = 'live'", [kind]).fetchone()[0]
            assert live == 1, f"{live} live {kind} versions"
            # The live version is the top of the promote/rollback history.
            assert reg._live_stack(store.db, kind)[-1] == reg.live(kind).id
        expected = {f"w{w}-{i}": i for w in range(workers) for i in range(ITERATIONS)}
        assert reg.get("metrics-target").metrics == {"seed": 1, **expected}
        assert reg.get_round(1).metrics == expected
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_threads_racing_on_the_registry_keep_one_live_version_and_every_update(tmp_db_path):
    target_id, round_id = _setup(tmp_db_path)
    errors: list[BaseException] = []
    with FeedbackStore(tmp_db_path) as store:

        def run(worker: int) -> None:
            try:
                _churn(tmp_db_path, worker, target_id, round_id, store)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    _check(tmp_db_path, 6)


def test_processes_racing_on_the_registry_keep_one_live_version_and_every_update(tmp_db_path):
    target_id, round_id = _setup(tmp_db_path)
    go = SPAWN.Barrier(3)
    procs = [SPAWN.Process(target=_churn, args=(tmp_db_path, w, target_id, round_id, None, go)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    _check(tmp_db_path, 3)


def test_the_database_refuses_a_second_live_version_of_a_kind(tmp_db_path):
    _setup(tmp_db_path)
    conn = sqlite3.connect(tmp_db_path)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute("UPDATE model_versions SET status = 'live' WHERE name = 'policy-1'")
    conn.execute("UPDATE model_versions SET status = 'live' WHERE name = 'policy-1' AND kind = 'reward'")  # no row
    conn.close()


def test_migration_repairs_two_live_versions_then_adds_the_index(tmp_db_path):
    db = sqlite_utils.Database(tmp_db_path)
    migrate(db, target=3)
    for i, promoted in ((1, "2026-01-01T00:00:00.000+00:00"), (2, "2026-02-01T00:00:00.000+00:00"),
                        (3, "2026-01-15T00:00:00.000+00:00")):
        db["model_versions"].insert({"id": i, "name": f"p{i}", "kind": "policy", "status": "live",
                                     "promoted_at": promoted, "created_at": promoted})
    db["model_versions"].insert({"id": 4, "name": "r", "kind": "reward", "status": "live", "created_at": "x"})
    db.close()
    with FeedbackStore(tmp_db_path) as store:  # opening migrates
        reg = ModelRegistry(store)
        assert reg.live("policy").name == "p2" and reg.live("reward").name == "r"
        assert [v.status for v in reg.list("policy")] == ["retired", "live", "retired"]
        log = reg.history("policy")
        assert sorted((r["action"], r["version_id"], r["actor"]) for r in log) == [
            ("retire", 1, "migration 4"), ("retire", 3, "migration 4")]
        assert "one_live_version_per_kind" in {i.name for i in store.db["model_versions"].indexes}
        reg.promote("p1")  # the registry still works on the repaired database
        assert reg.live("policy").name == "p1"
