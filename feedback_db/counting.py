"""Which feedback counts: the one rule that the exports and the dashboard share.

* Ratings: a user's LATEST rating of a reply counts; earlier ones are history. A latest
  rating of 0 ("cleared", an un-like) removes the user's rating of that reply. So 👍 then
  "Save feedback" (a second +1 row) is one thumbs-up, and 👍 changed to 👎 is one thumbs-down.
* Comparisons: a user's LATEST vote on a pair of replies counts (either order of A and B).
* Rankings: a user's LATEST ranking of the replies to one context counts.
* Feedback on a reply that failed or was stopped (UNVOTABLE_FINISH_REASONS) counts nowhere.

Each rule is a SQL query reading events up to `:snapshot` (the exports' reproducible
snapshot; the dashboard passes the latest). `exports.py` builds its rows from these queries,
and `analytics.py` counts from them, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

# A reply the engine failed on ("error") or the user stopped ("abort") is not what the model
# would have said: it cannot be rated, compared or ranked, and exports skip feedback on it
# stored before this rule. A reply cut off at max_tokens ("length") is what the model said
# under the serving budget, so it stays votable; exports mark it as not ended (the reward model then
# reads it without a stop token, as PPO's scorer reads a rollout cut at its token limit).
UNVOTABLE_FINISH_REASONS: tuple[str, ...] = ("error", "abort")
CUT_OFF_FINISH_REASON = "length"

_UNVOTABLE_SQL = ", ".join(f"'{reason}'" for reason in UNVOTABLE_FINISH_REASONS)
_VOTABLE = f"COALESCE(m.finish_reason, '') NOT IN ({_UNVOTABLE_SQL})"
_VOTABLE_PAIR = _VOTABLE.replace("m.", "ma.") + " AND " + _VOTABLE.replace("m.", "mb.")

LATEST_RATINGS = """
    SELECT r.id, r.user_id, r.message_id, r.value, r.event_id, r.created_at
    FROM ratings r
    WHERE r.event_id <= :snapshot AND r.event_id = (
        SELECT MAX(r2.event_id) FROM ratings r2
        WHERE r2.user_id = r.user_id AND r2.message_id = r.message_id AND r2.event_id <= :snapshot)
"""
"""Each user's latest rating of each reply (value 0 included: callers drop it as 'cleared')."""

LATEST_COMPARISONS = """
    SELECT c.* FROM comparisons c
    WHERE c.event_id <= :snapshot AND c.event_id = (
        SELECT MAX(c2.event_id) FROM comparisons c2
        WHERE c2.user_id = c.user_id AND c2.user_message_id = c.user_message_id
          AND MIN(c2.message_a, c2.message_b) = MIN(c.message_a, c.message_b)
          AND MAX(c2.message_a, c2.message_b) = MAX(c.message_a, c.message_b)
          AND c2.event_id <= :snapshot)
"""
"""Each user's latest vote on each pair of replies."""

LATEST_RANKINGS = """
    SELECT k.* FROM rankings k
    WHERE k.event_id <= :snapshot AND k.event_id = (
        SELECT MAX(k2.event_id) FROM rankings k2
        WHERE k2.user_id = k.user_id AND k2.user_message_id = k.user_message_id AND k2.event_id <= :snapshot)
"""
"""Each user's latest ranking of the replies to each context."""

EVERYTHING = 2**62  # a snapshot above every event id: "up to now"


def _snapshot(snapshot: int | None) -> int:
    return EVERYTHING if snapshot is None else snapshot


def latest_ratings(db: sqlite_utils.Database, snapshot: int | None = None) -> list[dict[str, Any]]:
    """Each user's latest rating of each reply (value 0 = cleared), oldest first, with the reply's
    context (`user_message_id`, the user message it answers)."""
    return list(db.query(
        f"""
        SELECT l.user_id, l.message_id, l.value, l.event_id, m.parent_id AS user_message_id
        FROM ({LATEST_RATINGS}) l JOIN messages m ON m.id = l.message_id
        ORDER BY l.event_id
        """,
        {"snapshot": _snapshot(snapshot)},
    ))


def thumbs_by_version(db: sqlite_utils.Database, snapshot: int | None = None) -> list[dict[str, Any]]:
    """Per model version: users' latest 👍 and 👎 on its (votable) replies and the up-rate."""
    return list(db.query(
        f"""
        SELECT mv.id AS model_version_id, mv.name AS model_version, mv.status,
               SUM(l.value = 1) AS thumbs_up, SUM(l.value = -1) AS thumbs_down,
               ROUND(1.0 * SUM(l.value = 1) / COUNT(*), 4) AS up_rate
        FROM ({LATEST_RATINGS}) l
        JOIN messages m ON m.id = l.message_id
        JOIN model_versions mv ON mv.id = m.model_version_id
        WHERE l.value != 0 AND {_VOTABLE}
        GROUP BY mv.id ORDER BY mv.id
        """,
        {"snapshot": _snapshot(snapshot)},
    ))


def counted_comparisons(db: sqlite_utils.Database, snapshot: int | None = None) -> list[dict[str, Any]]:
    """Each user's latest vote on each pair of (votable) replies, oldest first, with both replies'
    model versions (`version_a`, `version_b`)."""
    return list(db.query(
        f"""
        SELECT l.*, ma.model_version_id AS version_a, mb.model_version_id AS version_b
        FROM ({LATEST_COMPARISONS}) l
        JOIN messages ma ON ma.id = l.message_a JOIN messages mb ON mb.id = l.message_b
        WHERE {_VOTABLE_PAIR}
        ORDER BY l.event_id
        """,
        {"snapshot": _snapshot(snapshot)},
    ))


COUNTED_FEEDBACK = f"""
    SELECT l.created_at, CASE WHEN l.value > 0 THEN 'thumbs up' ELSE 'thumbs down' END AS kind
    FROM ({LATEST_RATINGS}) l JOIN messages m ON m.id = l.message_id
    WHERE l.value != 0 AND {_VOTABLE}
    UNION ALL SELECT l.created_at, 'comparison' FROM ({LATEST_COMPARISONS}) l
    JOIN messages ma ON ma.id = l.message_a JOIN messages mb ON mb.id = l.message_b
    WHERE {_VOTABLE_PAIR}
    UNION ALL SELECT created_at, 'ranking' FROM ({LATEST_RANKINGS})
    UNION ALL SELECT created_at, 'demonstration' FROM demonstrations WHERE event_id <= :snapshot
    UNION ALL SELECT created_at, 'message' FROM messages WHERE role = 'user' AND event_id <= :snapshot
"""
"""Every counted piece of feedback as (created_at, kind): 'thumbs up', 'thumbs down', 'comparison',
'ranking', 'demonstration' (every one: each is an SFT row), and the users' 'message's."""


def counted_totals(db: sqlite_utils.Database, snapshot: int | None = None) -> dict[str, int]:
    """How much feedback counts, by kind (see the module docstring): what the dashboard shows."""
    totals = {"thumbs up": 0, "thumbs down": 0, "comparison": 0, "ranking": 0, "demonstration": 0, "message": 0}
    for r in db.query(f"SELECT kind, COUNT(*) AS n FROM ({COUNTED_FEEDBACK}) GROUP BY kind",
                      {"snapshot": _snapshot(snapshot)}):
        totals[r["kind"]] = r["n"]
    return totals
