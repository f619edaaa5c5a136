"""Dashboard aggregates: win rate of a candidate vs live with a Wilson interval, feedback over time."""

from __future__ import annotations

import pytest

from feedback_db import FeedbackStore, ModelRegistry, Reply, feedback_over_time, wilson_interval, win_rate


def test_wilson_interval_matches_hand_computation():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # unanimous votes: the interval still contains the observed rate exactly
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0


def test_win_rate_counts_both_sides_and_ignores_ties(tmp_path):
    with FeedbackStore(tmp_path / "f.db") as store:
        reg = ModelRegistry(store)
        live = reg.ensure_base_policy("tiny")
        cand = reg.register("policy-r1", adapter_path="/a", base_model="tiny")
        u = store.ensure_user("u")
        conv = store.create_conversation(u, source="compare")
        outcomes = [("A", True), ("B", False), ("A", False), ("tie", True), ("both_bad", False), ("B", True)]
        for choice, candidate_on_left in outcomes:
            q = store.add_user_message(conv, u, "q", parent_id=None)
            left, right = (cand, live) if candidate_on_left else (live, cand)
            a = store.add_reply(conv, u, q, "left", Reply(left.id))
            b = store.add_reply(conv, u, q, "right", Reply(right.id))
            store.record_comparison(u, a, b, choice)
        wr = win_rate(store, cand.id, live.id)
        # candidate wins: A with cand left, B with cand right (row 2: B, cand right) -> 2 wins;
        # losses: A with cand right (row 3), B with cand left (row 6) -> 2 losses
        assert (wr.wins, wr.losses, wr.ties, wr.both_bad) == (2, 2, 1, 1)
        assert wr.rate == 0.5 and wr.ci_low < 0.5 < wr.ci_high
        kinds = {r["kind"] for r in feedback_over_time(store)}
        assert {"comparison", "message"} <= kinds
