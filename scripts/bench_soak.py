"""Soak benchmark: N simulated users on the live server for T minutes, first quiet, then disturbed.

The server is `alignloop serve` as a child process (fresh database). N users, each its own
gradio_client session, do what people do in a browser, in a loop, with a short pause between
actions: chat (streamed; the first token and the gaps between streamed updates are timed), 👍/👎
on the reply and sometimes "Save feedback" with a reason, Compare (two replies, a vote) and Rank
(K replies, a ranking). They only use the public API endpoints (api_name) and the CLI, as an
operator's tools would.

The run has two measured phases of the same load:

  quiet      the users alone;
  disturbed  the same users while the operator's work happens, one step after the other:
             a round registers a candidate (a real LoRA adapter, through ModelRegistry, inside a
             recorded training round), `alignloop promote` makes it live, and
             `alignloop db import` loads a JSONL of --import-rows preference rows. The phase lasts
             at least its share of T, and until the import has finished.

It prints and writes to --out (results.json, results.md):

  failed requests per phase                         target 0
  chat TTFT p50/p99, streamed-update gap p99,
    disturbed / quiet                               target <= 1.5x
  server RSS (the process and its children)         target flat: growth <= --rss-growth-limit
  rows lost: every write the app acknowledged
    (chat reply, rating, Compare vote, ranking,
    imported pair) is in the database at the end   target 0

    python scripts/bench_soak.py --tiny --out runs/soak-tiny        # smoke run, ~1-2 minutes
    python scripts/bench_soak.py --users 8 --minutes 10 --out runs/soak   # the embedded Gemma 3 270M

The gap is measured between the streamed updates a client receives (the app sends at most one
every 50 ms), which is what a user sees, not between the engine's tokens. An action counts in the
phase it started in; with replies slower than a phase, make T longer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chat_app.auth import UsersFile  # noqa: E402
from feedback_db import FeedbackStore, ModelRegistry  # noqa: E402
from scripts.bench_serving import PROMPTS, percentile  # noqa: E402
from scripts.server_process import ServerProcess, start_server, stop_server  # noqa: E402
from scripts.simulated_users import NoiseModel, SimulatedUser, mix_weights  # noqa: E402
from training.config import _f  # noqa: E402

PHASES = ("quiet", "disturbed")
ERROR_PREFIX = "⚠️"  # the service's text for a reply the engine could not produce
STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line, with the seconds since the script started."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", flush=True)


@dataclass
class SoakConfig:
    """One soak run; every field is a command-line option (--users 8, --minutes 10)."""

    out: str = _f("runs/bench-soak", "A folder for results.json, results.md and the server's log.")
    model: str = _f("default", "Base model: 'default' (embedded Gemma 3 270M), a prepared folder, an HF id, or 'tiny' (a tiny random model built for the run).")
    engine: str = _f("auto", "The server's engine: auto (vLLM when importable) | vllm | hf.")
    users: int = _f(8, "Concurrent simulated users, each its own session.")
    minutes: float = _f(10.0, "Wall time T of the two measured phases together (the disturbed phase may run longer: it lasts until the import has finished).")
    quiet_share: float = _f(0.4, "Share of T for the quiet phase; the rest is the disturbed phase.")
    action_mix: str = _f("chat:3,compare:1,rank:1", "Relative frequency of each action: chat (with 👍/👎), compare, rank.")
    think_s: float = _f(1.0, "Mean pause of a user between two actions, in seconds (exponentially distributed).")
    feedback_share: float = _f(0.5, "Share of chats whose thumb is followed by 'Save feedback' with a reason.")
    max_tokens: int = _f(64, "Reply length limit each user sets.")
    temperature: float = _f(0.8, "Sampling temperature each user sets.")
    rank_k: int = _f(4, "Replies per Rank action.")
    import_rows: int = _f(50_000, "Preference rows of the JSONL that `alignloop db import` loads in the disturbed phase.")
    rss_growth_limit: float = _f(0.10, "RSS counts as flat when it grew by at most this share from the start of the quiet phase to the end of the run.")
    slowdown_limit: float = _f(1.5, "Target for disturbed / quiet TTFT and streamed-update gap.")
    server_start_timeout_s: float = _f(600.0, "Give up if the server is not ready after this long.")
    seed: int = _f(0, "Seed of the users' choices and pauses.")
    tiny: bool = _f(False, "Smoke run: tiny random model, transformers engine, 3 users for 30 s, a 500-row import (checks that every step runs, not the numbers).")


def apply_tiny(cfg: SoakConfig) -> SoakConfig:
    """The --tiny settings: a tiny random model on the transformers engine, a short run, a small import."""
    return dataclasses.replace(cfg, model="tiny", engine="hf", users=3, minutes=0.5, think_s=0.3, max_tokens=12,
                               rank_k=3, import_rows=500)


# --------------------------------------------------------------------------- #
# What one user did
# --------------------------------------------------------------------------- #


@dataclass
class Request:
    """One call of an API endpoint (or `calls` in a row, e.g. /compare then /vote): when it started (seconds
    into the run), how long it took, and how it failed."""

    endpoint: str
    started_s: float
    calls: int = 1
    seconds: float = 0.0
    error: str | None = None


@dataclass
class ActionRecord:
    """One user action, its requests, its streaming times, and the writes the app acknowledged."""

    user: int
    kind: str
    prompt: str
    started_s: float
    requests: list[Request] = field(default_factory=list)
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    reply_acked: bool = False  # chat: the reply finished without an error (the app stores it)
    rating: int | None = None  # chat: the thumb the app acknowledged (1 or -1)
    vote: str | None = None  # compare: the acknowledged vote
    ranked: bool = False  # rank: the app said the ranking was saved


def reply_text(history: list) -> str:
    """The last chatbot message's text when it is the assistant's (Gradio 6 may send content as parts)."""
    if not history or not isinstance(history[-1], dict) or history[-1].get("role") != "assistant":
        return ""
    content = history[-1].get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def soak_user_name(index: int) -> str:
    return f"soak-{index}"


def soak_password(cfg: SoakConfig, index: int) -> str:
    return f"soak-pw-{cfg.seed}-{index:04d}"


class SoakUser:
    """One simulated user: a gradio_client session that acts until told to stop."""

    def __init__(self, index: int, url: str, cfg: SoakConfig, clock: Clock, password: str) -> None:
        from gradio_client import Client

        self.index, self.cfg, self.clock = index, cfg, clock
        self.rng = random.Random(cfg.seed * 1000 + index)
        # Logged in, as people who come back are: a fresh page (a new session) is the same user, not a
        # new anonymous identity (the server limits how many of those one address gets).
        self.client = Client(url, auth=(soak_user_name(index), password), verbose=False)
        self.sampling = ("", cfg.temperature, 0.95, cfg.max_tokens)
        # Votes and thumbs are coin flips (a user with no preference): the soak measures the server.
        self.sim = SimulatedUser(f"soak-{index}", self.client, gold=lambda prompt, reply: 0.0,
                                 noise=NoiseModel(temperature=math.inf, threshold=0.0), rng=self.rng,
                                 sampling=self.sampling, rank_k=cfg.rank_k)
        self.weights = mix_weights(cfg.action_mix)
        self.records: list[ActionRecord] = []
        self.count = 0

    def next_prompt(self) -> str:
        """A prompt no other action sends: the marker finds its rows in the database at the end."""
        self.count += 1
        return f"{PROMPTS[(self.index + self.count) % len(PROMPTS)]} (soak {self.index}-{self.count})"

    def run(self, stop: threading.Event) -> None:
        """Act until `stop` is set, pausing about `think_s` between actions."""
        kinds = list(self.weights)
        while not stop.is_set():
            self.act(self.rng.choices(kinds, [self.weights[k] for k in kinds])[0])
            stop.wait(self.rng.expovariate(1.0 / self.cfg.think_s) if self.cfg.think_s > 0 else 0.0)

    def act(self, kind: str) -> ActionRecord:
        record = ActionRecord(self.index, kind, self.next_prompt(), self.clock.now())
        {"chat": self.chat, "compare": self.compare, "rank": self.rank}[kind](record)
        self.records.append(record)
        return record

    def call(self, record: ActionRecord, endpoint: str, fn: Any, *args: Any, calls: int = 1) -> tuple[bool, Any]:
        """Run one request, timed: (True, its value), or (False, None) with the exception recorded as its failure."""
        request = Request(endpoint, self.clock.now(), calls)
        record.requests.append(request)
        try:
            return True, fn(*args)
        except Exception as exc:  # noqa: BLE001 - every failure is a result of the benchmark
            request.error = f"{type(exc).__name__}: {exc}"[:300]
            return False, None
        finally:
            request.seconds = self.clock.now() - request.started_s

    def chat(self, record: ActionRecord) -> None:
        """Ask in a new conversation (streamed), then 👍 or 👎, sometimes with a saved reason."""
        self.client.reset_session()  # a fresh page: a new conversation
        if not self.call(record, "/chat", self.stream_chat, record)[0]:
            return
        liked = self.rng.random() < 0.5
        # gradio_client cannot attach a click's LikeData; SimulatedUser sends the request a browser sends.
        if not self.call(record, "/like", self.sim._like, 1, liked)[0]:
            return
        record.rating = 1 if liked else -1
        if self.rng.random() < self.cfg.feedback_share:
            reasons = ["helpful"] if liked else ["unhelpful"]
            self.call(record, "/feedback", lambda: self.client.predict(reasons, "", api_name="/feedback"))

    def stream_chat(self, record: ActionRecord) -> None:
        """/chat as a browser calls it: time to the first text, and the gaps between text updates."""
        started = time.perf_counter()
        job = self.client.submit(record.prompt, [], *self.sampling, api_name="/chat")
        last_text, last_at = "", started
        for output in job:
            text, now = reply_text(list(output[1] or [])), time.perf_counter()
            if text and text != last_text:
                if record.ttft_s is None:
                    record.ttft_s = now - started
                else:
                    record.gaps_s.append(now - last_at)
                last_text, last_at = text, now
        final = job.result(timeout=600)
        status, reply = str(final[-1] or "").strip(), reply_text(list(final[1] or []))
        if status.startswith(ERROR_PREFIX) or reply.startswith(ERROR_PREFIX):  # other status lines are notes
            raise RuntimeError(f"the app answered with an error: {(status if status.startswith(ERROR_PREFIX) else reply)[:200]}")
        record.reply_acked = True

    def compare(self, record: ActionRecord) -> None:
        """Compare: two replies and a vote (two requests; SimulatedUser runs both)."""
        ok, action = self.call(record, "/compare+/vote", self.sim.act, "compare", record.prompt, calls=2)
        if ok:
            record.vote = action.choice

    def rank(self, record: ActionRecord) -> None:
        """Rank: K replies and their ranks (two requests; SimulatedUser runs both)."""
        record.ranked = self.call(record, "/rank+/submit_ranking", self.sim.act, "rank", record.prompt,
                                calls=2)[0]

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- #
# Time, phases and the server's memory
# --------------------------------------------------------------------------- #


class Clock:
    """Seconds since the run started, and where each phase begins and ends."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.bounds: dict[str, tuple[float, float]] = {}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def phase_of(self, t: float) -> str | None:
        return next((name for name, (a, b) in self.bounds.items() if a <= t < b), None)


def process_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (vLLM's engine is one): psutil, else /proc (the process only)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the server's RSS once per `interval_s` as (seconds into the run, MB)."""

    def __init__(self, pid: int, clock: Clock, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.clock, self.interval_s = pid, clock, interval_s
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def sample(self) -> None:
        try:
            self.samples.append((self.clock.now(), process_rss_bytes(self.pid) / 2**20))
        except Exception:  # noqa: BLE001 - the server may have just exited; a missing sample is no error
            pass

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval_s)


# --------------------------------------------------------------------------- #
# The operator's work in the disturbed phase
# --------------------------------------------------------------------------- #


@dataclass
class Disturbance:
    """One operator step: when it started (seconds into the run), how long it took, and what it said."""

    name: str
    started_s: float = 0.0
    seconds: float = 0.0
    ok: bool = False
    detail: str = ""


def write_preference_rows(path: Path, n: int, seed: int) -> Path:
    """A JSONL of `n` distinct preference rows in TRL's format (prompt, chosen, rejected)."""
    rng = random.Random(seed)
    words = "the a model reply user helpful short clear kind answer question careful polite long".split()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            prompt = f"Soak import question {i}: {' '.join(rng.choices(words, k=8))}?"
            chosen, rejected = " ".join(rng.choices(words, k=24)), " ".join(rng.choices(words, k=24))
            f.write(json.dumps({"prompt": prompt, "chosen": f"{chosen}.", "rejected": f"{rejected}!"}) + "\n")
    return path


def alignloop(*args: str, timeout: float = 3600.0) -> subprocess.CompletedProcess:
    """Run the `alignloop` CLI as an operator would (a separate process)."""
    return subprocess.run([sys.executable, "-m", "chat_app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def register_candidate(db_path: Path, adapter: Path, base_model: str, name: str) -> str:
    """What a round does at its end: record the round, register its adapter as a candidate, finish it."""
    with FeedbackStore(db_path) as store:
        registry = ModelRegistry(store)
        live = registry.live("policy")
        training_round = registry.start_round({"bench_soak": True}, store.snapshot())
        version = registry.register(name, adapter_path=adapter, base_model=base_model, round_id=training_round.id,
                                    parent_id=live.id if live else None, metrics={"bench_soak": True})
        registry.finish_round(training_round.id, "succeeded", metrics={"candidate": name})
    return f"{version.name} (id {version.id}) registered as a candidate in round {training_round.id}"


def run_disturbances(db_path: Path, adapter: Path, base_model: str, import_file: Path, import_source: str,
                     clock: Clock, start_s: float, span_s: float, results: list[Disturbance]) -> None:
    """Register a candidate at 10% of the disturbed phase, promote it at 30%, import at 45%; one after another."""
    name = f"soak-candidate-{int(time.time())}"

    def step(label: str, at: float, fn: Any) -> bool:
        time.sleep(max(0.0, start_s + at * span_s - clock.now()))
        d = Disturbance(label, clock.now())
        results.append(d)
        log(f"operator: {label}…")
        try:
            d.ok, d.detail = fn()
        except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
            d.detail = f"{type(exc).__name__}: {exc}"[:500]
        d.seconds = clock.now() - d.started_s
        return d.ok

    def cli(*args: str) -> tuple[bool, str]:
        done = alignloop(*args)
        return done.returncode == 0, (done.stdout.strip() or done.stderr.strip())[-500:]

    if step("register candidate", 0.10, lambda: (True, register_candidate(db_path, adapter, base_model, name))):
        step("alignloop promote", 0.30, lambda: cli("promote", name, "--db", str(db_path), "--actor", "bench-soak"))
    step("alignloop db import", 0.45, lambda: cli("db", "import", "--kind", "preferences", "--source", import_source,
                                                  "--db", str(db_path), str(import_file)))


# --------------------------------------------------------------------------- #
# Rows lost: every acknowledged write, looked up in the database at the end
# --------------------------------------------------------------------------- #


def _ids(conn: sqlite3.Connection, sql: str, values: list[Any]) -> list[tuple]:
    """`sql` with `IN (?, …)` for `values`, in chunks SQLite accepts."""
    rows: list[tuple] = []
    for i in range(0, len(values), 500):
        chunk = values[i:i + 500]
        rows += conn.execute(sql.replace("(?)", f"({','.join('?' * len(chunk))})"), chunk).fetchall()
    return rows


def count_lost_rows(db_path: Path, records: list[ActionRecord], import_source: str | None,
                    import_rows: int) -> dict[str, dict[str, int]]:
    """For each kind of acknowledged write: how many the users were told were saved, and how many are missing.

    Reads the database read-only after the server stopped; a prompt's marker finds its user message, and
    from it the reply, its latest rating, the Compare vote and the ranking."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)
    try:
        prompts = sorted({r.prompt for r in records})
        by_prompt: dict[str, list[int]] = {}
        for mid, content in _ids(conn, "SELECT id, content FROM messages WHERE role = 'user' AND content IN (?)",
                                 prompts):
            by_prompt.setdefault(content, []).append(mid)
        user_ids = [i for ids in by_prompt.values() for i in ids]
        replies: dict[int, list[int]] = {}
        for rid, parent in _ids(conn, "SELECT id, parent_id FROM messages WHERE role = 'assistant' "
                                      "AND parent_id IN (?)", user_ids):
            replies.setdefault(parent, []).append(rid)
        reply_ids = [i for ids in replies.values() for i in ids]
        latest: dict[int, int] = {}
        for mid, value in _ids(conn, "SELECT message_id, value FROM ratings WHERE message_id IN (?) ORDER BY id",
                               reply_ids):
            latest[mid] = value
        voted = {c for (c,) in _ids(conn, "SELECT user_message_id FROM comparisons WHERE user_message_id IN (?)", user_ids)}
        ranked = {c for (c,) in _ids(conn, "SELECT user_message_id FROM rankings WHERE user_message_id IN (?)", user_ids)}
        imported = conn.execute("SELECT COUNT(*) FROM comparisons WHERE client_id LIKE ?",
                                [f"import:{import_source}:pair:%"]).fetchone()[0] if import_source else 0
    finally:
        conn.close()

    def found(check: Any, acked: list[ActionRecord]) -> dict[str, int]:
        present = sum(bool(check(r)) for r in acked)
        return {"acked": len(acked), "found": present, "lost": len(acked) - present}

    def reply_of(r: ActionRecord) -> list[int]:
        return [rid for uid in by_prompt.get(r.prompt, []) for rid in replies.get(uid, [])]

    return {
        "chat replies": found(lambda r: reply_of(r), [r for r in records if r.reply_acked]),
        "ratings": found(lambda r: any(latest.get(rid) == r.rating for rid in reply_of(r)),
                         [r for r in records if r.rating is not None]),
        "compare votes": found(lambda r: voted & set(by_prompt.get(r.prompt, [])), [r for r in records if r.vote]),
        "rankings": found(lambda r: ranked & set(by_prompt.get(r.prompt, [])), [r for r in records if r.ranked]),
        "imported pairs": {"acked": import_rows if import_source else 0, "found": min(imported, import_rows),
                           "lost": max(0, import_rows - imported) if import_source else 0},
    }


# --------------------------------------------------------------------------- #
# Summaries
# --------------------------------------------------------------------------- #


def _p(values: list[float], q: float) -> float | None:
    return percentile(sorted(values), q) if values else None


def phase_summary(name: str, records: list[ActionRecord], clock: Clock, rss: list[tuple[float, float]]) -> dict:
    """Requests, failures, chat TTFT and streamed-update gaps, and RSS of one phase."""
    start, end = clock.bounds[name]
    mine = [r for r in records if clock.phase_of(r.started_s) == name]
    requests = [q for r in mine for q in r.requests]
    failed: dict[str, int] = {}
    for q in requests:
        if q.error:
            failed[q.endpoint] = failed.get(q.endpoint, 0) + 1
    ttfts = [r.ttft_s for r in mine if r.ttft_s is not None]
    gaps = [g for r in mine for g in r.gaps_s]
    memory = [mb for t, mb in rss if start <= t <= end]
    return {
        "seconds": round(end - start, 1),
        "actions": {k: sum(r.kind == k for r in mine) for k in sorted({r.kind for r in mine})},
        "requests": sum(q.calls for q in requests),
        "failed": sum(failed.values()),
        "failed_by_endpoint": failed,
        "errors": sorted({q.error for q in requests if q.error})[:5],
        "chats_timed": len(ttfts),
        "ttft_p50_s": _p(ttfts, 50),
        "ttft_p99_s": _p(ttfts, 99),
        "gaps": len(gaps),
        "gap_p50_s": _p(gaps, 50),
        "gap_p99_s": _p(gaps, 99),
        "rss_mb_start": memory[0] if memory else None,
        "rss_mb_end": memory[-1] if memory else None,
        "rss_mb_peak": max(memory) if memory else None,
    }


def ttft_by_step(records: list[ActionRecord], clock: Clock, disturbances: list[Disturbance]) -> list[dict]:
    """Chat TTFT while each operator step ran, and in the disturbed phase outside every step: which step slows
    the first token. A chat counts for a step when its wait for the first token overlapped the step (whatever
    phase it started in); a chat that never got one counts as waiting until the run's end."""
    start, end = clock.bounds["disturbed"]
    chats = [r for r in records if r.kind == "chat"]

    def waited_until(r: ActionRecord) -> float:
        return r.started_s + r.ttft_s if r.ttft_s is not None else math.inf

    def window(name: str, mine: list[ActionRecord]) -> dict:
        ttfts = [r.ttft_s for r in mine if r.ttft_s is not None]
        return {"window": name, "chats": len(mine), "no_first_token": len(mine) - len(ttfts),
                "ttft_p50_s": _p(ttfts, 50), "ttft_max_s": max(ttfts, default=None)}

    rows, during_any = [], set()
    for d in disturbances:
        mine = [r for r in chats if r.started_s < d.started_s + d.seconds and waited_until(r) > d.started_s]
        during_any.update(id(r) for r in mine)
        rows.append(window(d.name, mine))
    rest = [r for r in chats if start <= r.started_s < end and id(r) not in during_any]
    return rows + [window("no operator step", rest)]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(cfg: SoakConfig, records: list[ActionRecord], clock: Clock, rss: list[tuple[float, float]],
              disturbances: list[Disturbance], rows: dict[str, dict[str, int]], wall_s: float) -> dict:
    """Everything results.json holds: the phases, the disturbed / quiet ratios, RSS, rows and the targets."""
    phases = {name: phase_summary(name, records, clock, rss) for name in PHASES}
    quiet, disturbed = phases["quiet"], phases["disturbed"]
    ratios = {key: _ratio(disturbed[key], quiet[key]) for key in ("ttft_p50_s", "ttft_p99_s", "gap_p99_s")}
    run_memory = [mb for t, mb in rss if clock.bounds["quiet"][0] <= t <= clock.bounds["disturbed"][1]]
    growth = (run_memory[-1] - run_memory[0]) / run_memory[0] if run_memory else None
    failed = quiet["failed"] + disturbed["failed"]
    lost = sum(r["lost"] for r in rows.values())
    worst = max((v for v in ratios.values() if v is not None), default=None)
    targets = {
        "failed requests": {"value": failed, "target": "0", "met": failed == 0},
        "disturbed / quiet latency (worst of TTFT p50, p99, gap p99)": {
            "value": worst, "target": f"<= {cfg.slowdown_limit}", "met": worst is not None and worst <= cfg.slowdown_limit},
        "RSS growth (quiet start to run end)": {
            "value": growth, "target": f"<= {cfg.rss_growth_limit:.0%}",
            "met": growth is not None and growth <= cfg.rss_growth_limit},
        "rows lost": {"value": lost, "target": "0", "met": lost == 0},
        "operator steps succeeded": {"value": sum(d.ok for d in disturbances), "target": "3",
                                     "met": len(disturbances) == 3 and all(d.ok for d in disturbances)},
    }
    return {
        "config": dataclasses.asdict(cfg),
        "phases": phases,
        "ratios": ratios,
        "rss": {"growth": growth, "mb_start": run_memory[0] if run_memory else None,
                "mb_end": run_memory[-1] if run_memory else None, "mb_peak": max(run_memory) if run_memory else None,
                "samples": [[round(t, 1), round(mb, 1)] for t, mb in rss]},
        "rows": rows,
        "disturbances": [dataclasses.asdict(d) for d in disturbances],
        "ttft_by_step": ttft_by_step(records, clock, disturbances),
        "chats": [[round(r.started_s, 2), round(r.ttft_s, 3)] for r in records if r.ttft_s is not None],
        "targets": targets,
        "wall_seconds": round(wall_s, 1),
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def report_lines(results: dict) -> list[str]:
    """results.md: the phases side by side, the operator's steps, rows lost and the targets, as Markdown tables."""
    cfg, phases = results["config"], results["phases"]
    quiet, disturbed = phases["quiet"], phases["disturbed"]
    lines = [f"# bench_soak: {cfg['users']} users, {cfg['minutes']:g} min, model `{cfg['model']}` ({cfg['engine']})", "",
             "| | quiet | disturbed | disturbed / quiet |", "|---|---|---|---|"]
    for label, key, spec in (("seconds", "seconds", ".1f"), ("requests", "requests", "d"),
                             ("failed requests", "failed", "d"), ("chats timed", "chats_timed", "d"),
                             ("TTFT p50 (s)", "ttft_p50_s", ".3f"), ("TTFT p99 (s)", "ttft_p99_s", ".3f"),
                             ("streamed-update gap p50 (s)", "gap_p50_s", ".3f"),
                             ("streamed-update gap p99 (s)", "gap_p99_s", ".3f"),
                             ("server RSS start (MB)", "rss_mb_start", ".0f"), ("server RSS end (MB)", "rss_mb_end", ".0f"),
                             ("server RSS peak (MB)", "rss_mb_peak", ".0f")):
        ratio = results["ratios"].get(key)
        lines.append(f"| {label} | {_fmt(quiet[key], spec)} | {_fmt(disturbed[key], spec)} | "
                     f"{_fmt(ratio, '.2f') + 'x' if ratio is not None else ''} |")
    lines += ["", "| operator step | at (s) | took (s) | ok | output |", "|---|---|---|---|---|"]
    lines += [f"| {d['name']} | {d['started_s']:.1f} | {d['seconds']:.1f} | {'yes' if d['ok'] else 'NO'} "
              f"| {d['detail'].splitlines()[-1].replace('|', '/') if d['detail'] else ''} |"
              for d in results["disturbances"]]
    lines += ["", "| chats waiting for their first token while… | chats | no first token | TTFT p50 (s) | TTFT max (s) |",
              "|---|---|---|---|---|"]
    lines += [f"| {w['window']} | {w['chats']} | {w['no_first_token']} | {_fmt(w['ttft_p50_s'])} | "
              f"{_fmt(w['ttft_max_s'])} |" for w in results.get("ttft_by_step", [])]
    lines += ["", "| acknowledged writes | acked | in the database | lost |", "|---|---|---|---|"]
    lines += [f"| {kind} | {r['acked']} | {r['found']} | {r['lost']} |" for kind, r in results["rows"].items()]
    lines += ["", "| target | value | wanted | |", "|---|---|---|---|"]
    for name, t in results["targets"].items():
        value = f"{t['value']:.1%}" if name.startswith("RSS") and t["value"] is not None else _fmt(t["value"], ".2f")
        lines.append(f"| {name} | {value} | {t['target']} | {'met' if t['met'] else 'MISSED'} |")
    errors = sorted({e for p in phases.values() for e in p["errors"]})
    if errors:
        lines += ["", "Errors (first of each kind):", ""] + [f"- `{e.replace('`', chr(39))}`" for e in errors[:8]]
    return lines + ["", f"Wall time {results['wall_seconds']:.0f} s."]


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


def prepare(cfg: SoakConfig, workdir: Path) -> tuple[str, Path, str]:
    """The model the server runs (a name or folder), its local folder, and the base name versions record."""
    from training.base_models import build_tiny_model, prepare_model, resolve_model

    if cfg.model == "tiny":
        path = build_tiny_model(workdir / "tiny-gemma3")
        return str(path), path, resolve_model(path).name
    return cfg.model, Path(prepare_model(cfg.model)), resolve_model(cfg.model).name


def run(cfg: SoakConfig) -> dict:
    """Start the server, run the quiet then the disturbed phase, stop, check the rows; return the results."""
    from tests.engine_contract import make_lora_adapter  # a random LoRA that visibly changes the output

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    wall = time.perf_counter()
    try:
        model, model_path, base_name = prepare(cfg, workdir)
        import_source = f"soak-{int(time.time())}"
        log(f"starting the server ({cfg.engine} engine); meanwhile building the candidate's LoRA adapter and "
            f"the import file…")
        with ThreadPoolExecutor(1) as pool:  # not measured: both are ready before the users start
            adapter = pool.submit(make_lora_adapter, model_path, workdir / "candidate-lora", seed=cfg.seed + 1)
            import_file = pool.submit(write_preference_rows, workdir / "preferences.jsonl", cfg.import_rows, cfg.seed)
            server_dir = workdir / "server"
            server_dir.mkdir()
            users_file = UsersFile(server_dir / "users.json")  # passwords never on the server's command line
            for i in range(cfg.users):
                users_file.add(soak_user_name(i), soak_password(cfg, i), replace=True)
            server = start_server(model, server_dir, engine=cfg.engine, timeout=cfg.server_start_timeout_s,
                                  serve_args=["--max-new-tokens", str(cfg.max_tokens), "--rate-limit", "0",
                                              "--users-file", str(users_file.path)],
                                  env={"ALIGNLOOP_CACHE": str(workdir / "cache")} if cfg.model == "tiny" else None)
        try:
            records, clock, rss, disturbances = soak(cfg, server, adapter.result(), base_name, import_file.result(),
                                                     import_source)
        finally:
            log("stopping the server, then looking up every acknowledged write…")
            stop_server(server)
            shutil.copy(server.log_path, out / "server.log")
        rows = count_lost_rows(server.db_path, records, import_source if any(
            d.name == "alignloop db import" and d.ok for d in disturbances) else None, cfg.import_rows)
        results = summarise(cfg, records, clock, rss, disturbances, rows, time.perf_counter() - wall)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    lines = report_lines(results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nresults in {out}: results.json, results.md, server.log")
    return results


def soak(cfg: SoakConfig, server: ServerProcess, adapter: Path, base_name: str, import_file: Path,
         import_source: str) -> tuple[list[ActionRecord], Clock, list[tuple[float, float]], list[Disturbance]]:
    """The users warm up (one chat each, not measured), act through the quiet phase, then through the
    disturbed one while the operator's steps run; returns every action, the clock, RSS samples and the steps."""
    clock = Clock()
    log(f"server ready; {cfg.users} users warm up (one chat each, not measured)…")
    users = [SoakUser(i, server.url, cfg, clock, soak_password(cfg, i)) for i in range(cfg.users)]
    warmups = [threading.Thread(target=u.act, args=("chat",)) for u in users]
    for t in warmups:
        t.start()
    for t in warmups:
        t.join()
    for u in users:
        u.records.clear()  # warm-up: compilation, caches, first sessions

    sampler = RssSampler(server.process.pid, clock)
    stop = threading.Event()
    threads = [threading.Thread(target=u.run, args=(stop,), daemon=True) for u in users]
    total_s = cfg.minutes * 60
    quiet_s, disturbed_s = total_s * cfg.quiet_share, total_s * (1 - cfg.quiet_share)
    start = clock.now()
    clock.bounds["quiet"] = (start, start + quiet_s)
    sampler.sample()
    sampler.start()
    for t in threads:
        t.start()
    log(f"quiet phase: {quiet_s:.0f} s, {cfg.users} users…")
    time.sleep(quiet_s)

    disturbed_start = clock.now()
    clock.bounds["quiet"] = (start, disturbed_start)
    clock.bounds["disturbed"] = (disturbed_start, math.inf)
    log(f"disturbed phase: at least {disturbed_s:.0f} s; a round registers a candidate, `alignloop promote`, "
        f"a {cfg.import_rows}-row `alignloop db import`…")
    disturbances: list[Disturbance] = []
    operator = threading.Thread(target=run_disturbances, daemon=True,
                                args=(server.db_path, adapter, base_name, import_file, import_source, clock,
                                      disturbed_start, disturbed_s, disturbances))
    operator.start()
    time.sleep(disturbed_s)
    operator.join()
    # The phase ends no sooner than a few seconds after the last step (the import may outlast its share).
    last_step_end = max((d.started_s + d.seconds for d in disturbances), default=0.0)
    time.sleep(max(0.0, last_step_end + min(5.0, 0.1 * disturbed_s) - clock.now()))
    stop.set()
    clock.bounds["disturbed"] = (disturbed_start, clock.now())
    for t in threads:
        t.join(timeout=600)
    sampler.sample()
    sampler.stop.set()
    sampler.join()
    for u in users:
        u.close()
    return [r for u in users for r in u.records], clock, sampler.samples, disturbances


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    """A SoakConfig from the command line (each field is `--name-with-dashes`, its help the field's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(SoakConfig):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        helptext = f.metadata["help"] + f" (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=helptext)
        else:
            parser.add_argument(flag, type=type(default), default=None, help=helptext)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    base = apply_tiny(SoakConfig()) if given.get("tiny") else SoakConfig()
    cfg = dataclasses.replace(base, **given)  # options given explicitly win over --tiny's
    if cfg.users < 1 or cfg.minutes <= 0 or not 0 < cfg.quiet_share < 1 or cfg.import_rows < 1:
        parser.error("--users and --import-rows must be at least 1, --minutes above 0, --quiet-share in (0, 1).")
    try:
        weights = mix_weights(cfg.action_mix)
    except ValueError as exc:
        parser.error(str(exc))
    if set(weights) - {"chat", "compare", "rank"}:
        parser.error("--action-mix takes chat, compare and rank (the soak writes no demonstrations).")
    return cfg


if __name__ == "__main__":  # vLLM starts its engine process: keep it under the main guard
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(parse_args())
