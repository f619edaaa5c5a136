"""feedback_db.leaderboard: Bradley–Terry ratings with bootstrap intervals from counted Compare votes,
and `alignloop db leaderboard`."""

from __future__ import annotations

import random

import numpy as np
from typer.testing import CliRunner

from feedback_db import FeedbackStore, ModelRegistry, Reply, leaderboard
from feedback_db.cli import app
from feedback_db.leaderboard import bradley_terry


def test_bradley_terry_recovers_the_order_and_the_gap() -> None:
    rng = random.Random(0)
    strength = {0: 1.0, 1: 0.5, 2: 0.25}  # each beats the next two times in three
    outcomes = []
    for _ in range(3000):
        i, j = rng.sample(range(3), 2)
        outcomes.append((i, j, 1.0 if rng.random() < strength[i] / (strength[i] + strength[j]) else 0.0))
    ratings = bradley_terry(np.array(outcomes), 3)
    assert ratings[0] > ratings[1] > ratings[2]
    assert abs((ratings[0] - ratings[1]) - 400 * np.log10(2)) < 25  # 120 Elo points for 2:1 odds
    assert abs(ratings.mean() - 1000) < 1e-6


def test_leaderboard_counts_latest_votes_and_orders_versions(tmp_path) -> None:
    with FeedbackStore(tmp_path / "f.db") as store:
        reg = ModelRegistry(store)
        strong, weak = (reg.register(name, kind="policy", base_model="tiny") for name in ("strong", "weak"))
        for u in range(12):
            user = store.ensure_user(f"user{u}")
            conv = store.create_conversation(user)
            q = store.add_user_message(conv, user, f"question {u}")
            a = store.add_reply(conv, user, q, "good", Reply(strong.id))
            b = store.add_reply(conv, user, q, "bad", Reply(weak.id))
            store.record_comparison(user, a, b, "B")  # changed below: only the latest vote counts
            store.record_comparison(user, a, b, "A" if u < 10 else "tie")
        rows = leaderboard(store, bootstrap=100)
    assert [r.name for r in rows] == ["strong", "weak"]
    assert (rows[0].wins, rows[0].losses, rows[0].ties, rows[0].votes) == (10, 0, 2, 12)
    assert rows[0].ci_low > rows[1].ci_high  # 10 of 12 and no loss: clearly better
    assert rows[0].ci_low <= rows[0].rating <= rows[0].ci_high

    result = CliRunner().invoke(app, ["leaderboard", "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split()[:2] == ["1", "strong"] and "10/0/2" in result.output
