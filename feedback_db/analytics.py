"""Read-only aggregates for the operators' dashboard and round reports.

Every number here counts feedback by the rule the exports use (counting.py): a user's latest
rating of a reply (a latest 0 removes it), a user's latest vote on a pair of replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import counting
from .sequential_testing import Vote
from .store import FeedbackStore


@dataclass
class WinRate:
    """Pairwise outcome of `candidate` against `baseline` in Compare votes."""

    candidate: str
    baseline: str
    wins: int
    losses: int
    ties: int
    both_bad: int
    rate: float | None  # wins / (wins + losses); ties and both-bad count for neither side
    ci_low: float | None  # 95% Wilson interval
    ci_high: float | None

    @property
    def decisive(self) -> int:
        return self.wins + self.losses


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval always holds p; at p = 0 or 1 rounding alone would leave it out (0.9999999 < 1).
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def head_to_head_votes(store: FeedbackStore, candidate_id: int, baseline_id: int) -> list[Vote]:
    """Every Compare vote between a reply of `candidate_id` and one of `baseline_id`, oldest first,
    as seen from the candidate's side ('win', 'loss', 'tie', 'both_bad').

    All votes, repeats included: this is the vote stream of the promotion test, which counts the
    FIRST vote on each pair (a later vote replacing an earlier one would change the past and void
    the test's error bound; see sequential_testing.py). Dashboard numbers use `win_rate`."""
    votes = []
    for r in store.db.query(
        """
        SELECT c.user_id, c.choice, c.message_a, c.message_b, ma.model_version_id AS va,
               ma.content AS text_a, mb.content AS text_b
        FROM comparisons c
        JOIN messages ma ON ma.id = c.message_a JOIN messages mb ON mb.id = c.message_b
        WHERE (ma.model_version_id = :c AND mb.model_version_id = :b)
           OR (ma.model_version_id = :b AND mb.model_version_id = :c)
        ORDER BY c.id
        """,
        {"c": candidate_id, "b": baseline_id},
    ):
        if r["choice"] in ("tie", "both_bad"):
            outcome = r["choice"]
        else:
            candidate_on_a = r["va"] == candidate_id
            outcome = "win" if (r["choice"] == "A") == candidate_on_a else "loss"
        votes.append(Vote(voter=r["user_id"], outcome=outcome,
                          identical_texts=r["text_a"].strip() == r["text_b"].strip(),
                          pair=(min(r["message_a"], r["message_b"]), max(r["message_a"], r["message_b"]))))
    return votes


def win_rate(store: FeedbackStore, candidate_id: int, baseline_id: int) -> WinRate:
    """How often replies of `candidate_id` beat replies of `baseline_id` when compared head to head:
    each user's latest vote on each pair counts once (the exports' rule); ties and both-bad count
    for neither side. (The promotion test's counting rules are in sequential_testing.py.)"""
    names = {r["id"]: r["name"] for r in store.db.query(
        "SELECT id, name FROM model_versions WHERE id IN (?, ?)", [candidate_id, baseline_id])}
    counts = {"win": 0, "loss": 0, "tie": 0, "both_bad": 0}
    for c in counting.counted_comparisons(store.db):
        if {c["version_a"], c["version_b"]} != {candidate_id, baseline_id} or candidate_id == baseline_id:
            continue
        if c["choice"] in ("tie", "both_bad"):
            counts[c["choice"]] += 1
        else:
            counts["win" if (c["choice"] == "A") == (c["version_a"] == candidate_id) else "loss"] += 1
    n = counts["win"] + counts["loss"]
    low, high = wilson_interval(counts["win"], n) if n else (None, None)
    return WinRate(names.get(candidate_id, str(candidate_id)), names.get(baseline_id, str(baseline_id)),
                   counts["win"], counts["loss"], counts["tie"], counts["both_bad"],
                   counts["win"] / n if n else None, low, high)


def feedback_over_time(store: FeedbackStore, bucket: str = "hour") -> list[dict]:
    """Counted feedback of each kind per time bucket ('hour' or 'day'), oldest first: users' latest
    thumbs up / down (by the time of that latest rating), latest comparisons and rankings,
    demonstrations and user messages (see counting.COUNTED_FEEDBACK)."""
    width = {"hour": 13, "day": 10}[bucket]  # prefix length of the ISO timestamp
    return list(store.db.query(
        f"""
        SELECT substr(created_at, 1, {width}) AS bucket, kind, COUNT(*) AS n
        FROM ({counting.COUNTED_FEEDBACK}) GROUP BY bucket, kind ORDER BY bucket, kind
        """,
        {"snapshot": counting.EVERYTHING},
    ))


def thumbs_by_version(store: FeedbackStore) -> list[dict]:
    """Users' latest 👍 / 👎 and the up-rate per model version (a latest 0 removes a rating)."""
    return counting.thumbs_by_version(store.db)
