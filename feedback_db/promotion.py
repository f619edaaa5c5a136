"""Automatic promotion of a candidate that users prefer, by the numbers.

A candidate is promoted when its round's gates passed (metric `gates_passed`) and, after at
least `min_votes` decisive Compare votes against the live version, the 95% Wilson lower
bound of its win rate is above 50%. Safe to call often, from the server or from cron.
"""

from __future__ import annotations

from .analytics import win_rate
from .errors import RegistryError
from .registry import ModelRegistry
from .store import FeedbackStore


def auto_promote_candidate(store: FeedbackStore, base_model: str, min_votes: int = 30) -> str | None:
    """Promote the newest gated policy candidate on `base_model` if users prefer it; return its name."""
    registry = ModelRegistry(store)
    live = registry.live("policy")
    if live is None:
        return None
    candidates = [c for c in registry.candidates("policy") if c.base_model in (None, base_model)]
    if not candidates or not candidates[0].metrics.get("gates_passed"):
        return None
    candidate = candidates[0]
    wr = win_rate(store, candidate.id, live.id)
    if wr.decisive < min_votes or wr.ci_low is None or wr.ci_low <= 0.5:
        return None
    try:
        registry.promote(candidate.id, actor="auto-promote")
    except RegistryError:
        return None  # promoted (or retired) by someone else meanwhile
    registry.update_metrics(candidate.id, {"auto_promoted": {"wins": wr.wins, "losses": wr.losses,
                                                             "ci_low": wr.ci_low, "ci_high": wr.ci_high}})
    return candidate.name
