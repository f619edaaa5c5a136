"""Dashboard aggregates: win rate of a candidate vs live with a Wilson interval, feedback over time."""

from __future__ import annotations

import pytest

from feedback_db import (
    FeedbackStore,
    ModelRegistry,
    Reply,
    export_preferences,
    export_thumbs,
    feedback_over_time,
    thumbs_by_version,
    wilson_interval,
    win_rate,
)


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


def _reply(store, user, version, text, *, finish_reason=None) -> int:
    conv = store.create_conversation(user)
    q = store.add_user_message(conv, user, f"prompt for {text}")
    return store.add_reply(conv, user, q, text, Reply(version.id, finish_reason=finish_reason))


def _pair(store, user, left, right, tag) -> tuple[int, int]:
    conv = store.create_conversation(user, source="compare")
    q = store.add_user_message(conv, user, f"compare {tag}")
    return (store.add_reply(conv, user, q, f"{tag} by {left.name}", Reply(left.id)),
            store.add_reply(conv, user, q, f"{tag} by {right.name}", Reply(right.id)))


def test_dashboard_numbers_count_each_users_latest_vote_like_the_exports(tmp_path):
    """Issue #10 row 7: 👍 then "Save feedback" is one thumbs-up, a changed vote counts once, a 0 un-likes."""
    with FeedbackStore(tmp_path / "f.db") as store:
        reg = ModelRegistry(store)
        live = reg.ensure_base_policy("tiny")
        cand = reg.register("policy-r1", adapter_path="/a", base_model="tiny")
        u1, u2 = store.ensure_user("u1"), store.ensure_user("u2")
        saved_twice = _reply(store, u1, live, "saved twice")
        store.record_rating(u1, saved_twice, 1)
        store.record_rating(u1, saved_twice, 1, reasons=["helpful"], comment="Save feedback")
        changed = _reply(store, u1, live, "changed to down")
        store.record_rating(u1, changed, 1)
        store.record_rating(u1, changed, -1)
        unliked = _reply(store, u1, cand, "unliked")
        store.record_rating(u1, unliked, 1)
        store.record_rating(u1, unliked, 0)
        down = _reply(store, u1, cand, "plain down")
        store.record_rating(u1, down, -1)
        triple = _reply(store, u2, cand, "liked three times")
        for _ in range(3):
            store.record_rating(u2, triple, 1)
        failed = _reply(store, u2, cand, "", finish_reason="error")
        with store.transaction() as db:  # a rating stored before the store refused failed replies
            db["ratings"].insert({"message_id": failed, "user_id": u2, "value": 1, "reasons": "[]",
                                  "created_at": "2026-01-01T00:00:00.000+00:00",
                                  "event_id": store._new_event(db, "ratings")})

        # Comparisons: a changed vote, a repeated vote, a vote changed to a tie.
        a, b = _pair(store, u1, cand, live, "p1")
        store.record_comparison(u1, a, b, "A")
        store.record_comparison(u1, a, b, "B")
        store.record_comparison(u1, b, a, "A")  # the same pair, sides swapped: B (live) again
        a, b = _pair(store, u2, live, cand, "p2")
        store.record_comparison(u2, a, b, "B")
        store.record_comparison(u2, a, b, "B")
        a, b = _pair(store, u1, cand, live, "p3")
        store.record_comparison(u1, a, b, "A")
        store.record_comparison(u1, a, b, "tie")

        # What the exports say.
        thumbs = export_thumbs(store).rows
        version_of = {r["content"]: r["model_version_id"] for r in store.db["messages"].rows_where("role = 'assistant'")}
        expected: dict[int, list[int]] = {live.id: [0, 0], cand.id: [0, 0]}
        for row in thumbs:
            expected[version_of[row["completion"][0]["content"]]][0 if row["label"] else 1] += 1
        assert expected == {live.id: [1, 1], cand.id: [1, 1]}

        # The dashboard, `db stats`, and the browsing view agree with them.
        by_version = {r["model_version_id"]: [r["thumbs_up"], r["thumbs_down"]] for r in thumbs_by_version(store)}
        assert by_version == expected
        assert {r["model_version_id"]: [r["thumbs_up"], r["thumbs_down"]]
                for r in store.stats()["thumbs_by_version"]} == expected
        view = {r["model_version_id"]: [r["thumbs_up"], r["thumbs_down"]]
                for r in store.db.query("SELECT * FROM thumbs_by_version")}
        assert view == expected
        assert {r["up_rate"] for r in thumbs_by_version(store)} == {0.5}
        over_time = {}
        for r in feedback_over_time(store):
            over_time[r["kind"]] = over_time.get(r["kind"], 0) + r["n"]
        assert over_time["thumbs up"] == sum(row["label"] for row in thumbs) == 2
        assert over_time["thumbs down"] == sum(not row["label"] for row in thumbs) == 2
        assert "cleared" not in over_time
        assert over_time["comparison"] == 3  # one per user and pair
        assert store.stats()["counted"]["comparison"] == 3
        assert store.stats()["comparison_choices"] == {"A": 1, "B": 1, "tie": 1}  # p1 swapped: "A"

        prefs = export_preferences(store, include_thumbs=False).rows
        chosen_versions = [version_of[r["chosen"][0]["content"]] for r in prefs]
        wr = win_rate(store, cand.id, live.id)
        assert (wr.wins, wr.losses) == (chosen_versions.count(cand.id), chosen_versions.count(live.id)) == (1, 1)
        assert (wr.ties, wr.both_bad) == (1, 0)
        assert win_rate(store, live.id, cand.id).wins == 1
