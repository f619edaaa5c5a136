"""A leaderboard of model versions from every counted Compare vote, as Chatbot Arena computes one.

Bradley–Terry (Bradley & Terry 1952): P(i beats j) = p_i / (p_i + p_j). The strengths are the
maximum-likelihood fit over all counted votes (each user's latest vote on each pair of replies,
`counting.counted_comparisons`), found with Hunter's MM iteration (Hunter 2004):

    p_i <- W_i / sum_j n_ij / (p_i + p_j)

where W_i is i's wins and n_ij the votes between i and j. A tie or "both bad" is half a win each
way, as Arena counts ties. Every pair of versions that met also gets one virtual tie (a weak
prior), so a version that won every vote has a finite strength. Ratings are on Arena's Elo scale:
1000 + 400·log10(p_i / geometric mean of p). The 95% intervals are percentile bootstrap intervals
over votes resampled with replacement (Chiang et al. 2024, "Chatbot Arena").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from . import counting
from .store import FeedbackStore

ELO_SCALE = 400.0
ELO_MEAN = 1000.0
PRIOR_TIES = 1.0  # virtual ties per pair of versions that met


@dataclass(frozen=True)
class LeaderboardRow:
    """One version: its rating with a 95% bootstrap interval, and the counted votes behind it."""

    rank: int
    name: str
    rating: float
    ci_low: float
    ci_high: float
    votes: int
    wins: int
    losses: int
    ties: int


def bradley_terry(outcomes: np.ndarray, versions: int, *, iterations: int = 200, tol: float = 1e-9) -> np.ndarray:
    """Elo-scale ratings from `outcomes`, rows (i, j, score): score 1 if i won, 0 if j won, 0.5 a tie."""
    wins = np.zeros((versions, versions))
    for i, j, score in outcomes:
        wins[int(i), int(j)] += score
        wins[int(j), int(i)] += 1.0 - score
    met = (wins + wins.T) > 0
    wins = wins + PRIOR_TIES / 2 * met
    games = wins + wins.T
    p = np.ones(versions)
    for _ in range(iterations):
        denominator = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denominator > 0, wins.sum(axis=1) / np.maximum(denominator, 1e-300), p)
        new = new / math.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return ELO_MEAN + ELO_SCALE * np.log10(p)


def leaderboard(store: FeedbackStore, *, bootstrap: int = 200, seed: int = 0) -> list[LeaderboardRow]:
    """Every policy version with a counted Compare vote, best first."""
    votes = counting.counted_comparisons(store.db)
    votes = [v for v in votes if v["version_a"] is not None and v["version_b"] is not None
             and v["version_a"] != v["version_b"]]
    if not votes:
        return []
    ids = sorted({v["version_a"] for v in votes} | {v["version_b"] for v in votes})
    index = {version: k for k, version in enumerate(ids)}
    score = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}
    outcomes = np.array([(index[v["version_a"]], index[v["version_b"]], score[v["choice"]]) for v in votes])
    ratings = bradley_terry(outcomes, len(ids))
    rng = np.random.default_rng(seed)
    samples = np.array([bradley_terry(outcomes[rng.integers(0, len(outcomes), len(outcomes))], len(ids))
                        for _ in range(bootstrap)]) if bootstrap else ratings[None, :]
    low, high = np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # wins, losses, ties
    for i, j, s in outcomes:
        i, j = int(i), int(j)
        if s == 0.5:
            tally[i][2] += 1
            tally[j][2] += 1
        else:
            tally[i if s == 1.0 else j][0] += 1
            tally[j if s == 1.0 else i][1] += 1
    names = {r["id"]: r["name"] for r in store.db.query(
        f"SELECT id, name FROM model_versions WHERE id IN ({', '.join('?' * len(ids))})", ids)}
    order = sorted(range(len(ids)), key=lambda k: -ratings[k])
    return [LeaderboardRow(rank + 1, names.get(ids[k], str(ids[k])), round(float(ratings[k]), 1),
                           round(float(low[k]), 1), round(float(high[k]), 1), sum(tally[k]), *tally[k])
            for rank, k in enumerate(order)]
