"""Benchmark: N writer processes record a mix of feedback events into one SQLite file for T seconds.

Prints events/s, p50/p99 write latency (one record_* call, lock wait included), and how many
events a writer was told were stored but are missing afterwards. Then runs again with one
writer killed by SIGKILL halfway through.

    python scripts/bench_feedback_db.py --writers 8 --seconds 10

Targets on the 2-core dev machine: >= 2,000 events/s with 8 writers, p99 < 25 ms, 0 lost.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feedback_db import FeedbackStore, ModelRegistry, Reply  # noqa: E402

TABLES = ("messages", "ratings", "comparisons", "rankings", "demonstrations")


def writer(db_path: str, worker: int, seconds: float, ack_path: str, start_at: float) -> None:
    """Record events until the deadline; append 'table id latency_us' to ack_path after each commit."""
    rng = random.Random(worker)
    store = FeedbackStore(db_path)
    version = ModelRegistry(store).get("base:bench").id
    user = store.ensure_user(f"bench-{worker}")
    conv = store.create_conversation(user)
    # Each context: a user turn with 4 replies, ready to be rated, compared and ranked.
    contexts: list[tuple[int, list[int]]] = []

    def new_context() -> list[tuple[str, int]]:
        parent = contexts[-1][1][0] if contexts else None
        q = store.add_user_message(conv, user, f"question {len(contexts)} from writer {worker}", parent_id=parent)
        replies = [store.add_reply(conv, user, q, f"reply {i} " * 20, Reply(version, {"temperature": 0.8}, 120.0, 30, 40))
                   for i in range(4)]
        contexts.append((q, replies))
        return [("messages", q)] + [("messages", r) for r in replies]

    new_context()
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    with open(ack_path, "w", buffering=1) as ack:
        n = 0
        while time.time() < deadline:
            q, replies = contexts[-1]
            kind = rng.random()
            t0 = time.perf_counter()
            if kind < 0.40:
                acked = [("ratings", store.record_rating(user, rng.choice(replies), rng.choice((1, -1)),
                                                         reasons=["helpful"], client_id=f"{worker}-{n}"))]
            elif kind < 0.65:
                a, b = rng.sample(replies, 2)
                acked = [("comparisons", store.record_comparison(user, a, b, rng.choice(("A", "B", "tie")),
                                                                 client_id=f"{worker}-{n}"))]
            elif kind < 0.75:
                acked = [("rankings", store.record_ranking(user, rng.sample(replies, 4), client_id=f"{worker}-{n}"))]
            elif kind < 0.85:
                acked = [("demonstrations", store.record_demonstration(user, q, "An ideal reply. " * 10,
                                                                       client_id=f"{worker}-{n}"))]
            else:
                t0 = None  # a new context is 5 record calls; time them one by one below
                acked = []
                parent = replies[0]
                for step in range(5):
                    t1 = time.perf_counter()
                    if step == 0:
                        q = store.add_user_message(conv, user, f"q{n} from {worker}", parent_id=parent)
                        new = ("messages", q)
                        fresh: list[int] = []
                    else:
                        r = store.add_reply(conv, user, q, f"reply {step} " * 20, Reply(version))
                        fresh.append(r)
                        new = ("messages", r)
                    ack.write(f"{new[0]} {new[1]} {int((time.perf_counter() - t1) * 1e6)}\n")
                contexts.append((q, fresh))
            if t0 is not None:
                us = int((time.perf_counter() - t0) * 1e6)
                for table, row_id in acked:
                    ack.write(f"{table} {row_id} {us}\n")
            n += 1
    store.close()


@dataclass
class Result:
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    lost: int
    integrity: str


def run(n_writers: int, seconds: float, kill_one: bool, workdir: Path) -> Result:
    db_path = workdir / ("kill.db" if kill_one else "bench.db")
    with FeedbackStore(db_path) as store:
        ModelRegistry(store).ensure_version("base:bench", kind="policy", base_model="bench")
    ctx = mp.get_context("fork")
    start_at = time.time() + 2.0  # let every writer finish its set-up first
    acks = [workdir / f"{db_path.stem}-ack-{w}.txt" for w in range(n_writers)]
    procs = [ctx.Process(target=writer, args=(str(db_path), w, seconds, str(acks[w]), start_at))
             for w in range(n_writers)]
    for p in procs:
        p.start()
    if kill_one:
        time.sleep(max(0.0, start_at - time.time()) + seconds / 2)
        os.kill(procs[0].pid, signal.SIGKILL)
    for p in procs:
        p.join()
    latencies: list[int] = []
    acked: dict[str, set[int]] = {t: set() for t in TABLES}
    for path in acks:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:  # a line cut short by SIGKILL was never acknowledged in full
                continue
            acked[parts[0]].add(int(parts[1]))
            latencies.append(int(parts[2]))
    with FeedbackStore(db_path) as store:
        lost = 0
        for table, ids in acked.items():
            present = {r[0] for r in store.db.execute(f"SELECT id FROM {table}")}
            lost += len(ids - present)
        integrity = store.db.execute("PRAGMA integrity_check").fetchone()[0]
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Result(len(latencies), seconds, q[49] / 1000, q[98] / 1000, lost, integrity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", "-n", type=int, default=8, help="writer processes (default 8)")
    parser.add_argument("--seconds", "-t", type=float, default=10.0, help="seconds each run records (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{args.writers} writers x {args.seconds:.0f} s, {os.cpu_count()} CPUs, SQLite WAL + synchronous=NORMAL")
        print(f"{'run':<22}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'lost':>6}  integrity")
        for kill in (False, True):
            r = run(args.writers, args.seconds, kill, Path(tmp))
            name = "steady" if not kill else "one writer SIGKILLed"
            print(f"{name:<22}{r.events / r.seconds:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.lost:>6}  {r.integrity}")


if __name__ == "__main__":
    main()
