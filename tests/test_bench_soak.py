"""scripts/bench_soak.py: option parsing, the rows-lost check on a real database, and the whole soak on the tiny
model (`--tiny`, a subprocess: the server, users in both phases, the operator's three steps, the results)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.bench_soak import ActionRecord, Clock, Disturbance, SoakConfig, count_lost_rows, parse_args, ttft_by_step

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_settings_yield_to_explicit_options() -> None:
    cfg = parse_args(["--tiny", "--users", "5"])
    assert cfg.tiny and cfg.model == "tiny" and cfg.engine == "hf" and cfg.users == 5
    assert cfg.import_rows < SoakConfig().import_rows
    assert parse_args([]) == SoakConfig()
    with pytest.raises(SystemExit):
        parse_args(["--action-mix", "chat:1,demonstrate:1"])


def test_ttft_by_step_puts_each_chat_under_the_operator_steps_its_wait_overlapped() -> None:
    clock = Clock()
    clock.bounds = {"quiet": (0.0, 100.0), "disturbed": (100.0, 300.0)}
    steps = [Disturbance("alignloop promote", 150.0, 10.0, True), Disturbance("alignloop db import", 200.0, 50.0, True)]
    chats = [ActionRecord(0, "chat", "q", 50.0, ttft_s=9.0),  # quiet phase: not counted
             ActionRecord(0, "chat", "a", 145.0, ttft_s=6.0),  # waits into the promotion
             ActionRecord(1, "chat", "b", 120.0, ttft_s=2.0),  # before any step
             ActionRecord(1, "chat", "c", 210.0, ttft_s=4.0),  # during the import
             ActionRecord(2, "chat", "d", 240.0, ttft_s=12.0),  # starts in the import, waits past its end
             ActionRecord(2, "chat", "e", 260.0, ttft_s=1.0),  # after both
             ActionRecord(3, "chat", "g", 230.0),  # no first token ever: it waited through the rest of the import
             ActionRecord(3, "compare", "f", 205.0)]  # not a chat
    rows = {r["window"]: r for r in ttft_by_step(chats, clock, steps)}
    assert rows["alignloop promote"] == {"window": "alignloop promote", "chats": 1, "no_first_token": 0,
                                         "ttft_p50_s": 6.0, "ttft_max_s": 6.0}
    imported = rows["alignloop db import"]
    assert (imported["chats"], imported["no_first_token"], imported["ttft_max_s"]) == (3, 1, 12.0)
    assert 4.0 <= imported["ttft_p50_s"] <= 12.0  # of the two first tokens that came (the run's percentile rule)
    assert rows["no operator step"]["chats"] == 2 and rows["no operator step"]["ttft_max_s"] == 2.0


def test_rows_lost_counts_acknowledged_writes_missing_from_the_database(tmp_db_path: Path) -> None:
    from feedback_db import FeedbackStore, ModelRegistry
    from feedback_db.store import Reply

    with FeedbackStore(tmp_db_path) as store:
        version = ModelRegistry(store).ensure_base_policy("tiny")
        user = store.ensure_user("u1")
        conv = store.create_conversation(user)
        prompt = store.add_user_message(conv, user, "Hi (soak 0-1)")
        reply = store.add_reply(conv, user, prompt, "Hello", Reply(version.id))
        store.record_rating(user, reply, 1)
    saved = ActionRecord(0, "chat", "Hi (soak 0-1)", 0.0, reply_acked=True, rating=1)
    flipped = ActionRecord(0, "chat", "Hi (soak 0-1)", 0.0, reply_acked=True, rating=-1)  # not what was stored
    missing = ActionRecord(0, "chat", "Never stored (soak 0-2)", 0.0, reply_acked=True, rating=1)
    vote = ActionRecord(0, "compare", "Hi (soak 0-1)", 0.0, vote="A")  # no comparison row
    rows = count_lost_rows(tmp_db_path, [saved, flipped, missing, vote], None, 0)
    assert rows["chat replies"] == {"acked": 3, "found": 2, "lost": 1}
    assert rows["ratings"] == {"acked": 3, "found": 1, "lost": 2}
    assert rows["compare votes"] == {"acked": 1, "found": 0, "lost": 1}
    assert rows["rankings"]["acked"] == 0


def test_tiny_soak_runs_both_phases_and_every_operator_step(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_soak.py"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"config", "phases", "ratios", "rss", "rows", "disturbances", "targets", "wall_seconds"}
    assert list(results["phases"]) == ["quiet", "disturbed"]
    for phase in results["phases"].values():
        assert phase["requests"] > 0 and phase["chats_timed"] > 0 and phase["ttft_p50_s"] is not None
        assert {"failed", "ttft_p99_s", "gap_p99_s", "rss_mb_start", "rss_mb_end"} <= set(phase)
    assert set(results["ratios"]) == {"ttft_p50_s", "ttft_p99_s", "gap_p99_s"}
    assert [d["name"] for d in results["disturbances"]] == ["register candidate", "alignloop promote",
                                                            "alignloop db import"]
    assert all(d["ok"] for d in results["disturbances"]), results["disturbances"]
    assert results["rows"]["chat replies"]["acked"] > 0 and results["rows"]["imported pairs"]["acked"] == 500
    assert [w["window"] for w in results["ttft_by_step"]] == ["register candidate", "alignloop promote",
                                                              "alignloop db import", "no operator step"]
    assert results["chats"] and all(ttft > 0 for _, ttft in results["chats"])
    assert len(results["rss"]["samples"]) >= 2 and results["rss"]["mb_start"] > 0
    assert {"failed requests", "rows lost"} <= set(results["targets"])
    assert "| failed requests |" in done.stdout and (out / "results.md").is_file() and (out / "server.log").is_file()
    print(f"bench_soak --tiny: {time.monotonic() - started:.0f} s\n{(out / 'results.md').read_text()}")
