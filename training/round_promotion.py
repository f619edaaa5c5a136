"""After a round: whether a fresh install needs its first version, and auto-promotion of the newest
candidate by its users' Compare votes (the sequential test of feedback_db/sequential_testing.py)."""

from __future__ import annotations

from typing import Any

from training.round_config import RoundConfig


def first_run_needed(registry: Any) -> bool:
    """Whether a fresh install should train its first aligned version: the live policy is the bare base
    (or nothing is live yet), no policy version with an adapter was ever registered, and no round runs."""
    live = registry.live("policy")
    if live is not None and live.adapter_path:
        return False
    if any(v.adapter_path for v in registry.list(kind="policy")):
        return False
    return registry.running_round() is None


def promotion_policy(config: RoundConfig) -> Any:
    """The sequential test's settings (feedback_db.PromotionPolicy) that ``config`` describes."""
    from feedback_db import PromotionPolicy

    return PromotionPolicy(alpha=config.promote_alpha, min_voters=config.promote_min_voters,
                           max_votes_per_voter=config.promote_max_votes_per_voter, min_votes=config.min_votes)


def maybe_auto_promote(store: Any, config: RoundConfig) -> str | None:
    """Promote the newest policy candidate if auto-promotion is on, its gates passed, and its Compare votes
    against live pass the sequential test (:func:`promotion_policy`).

    Returns the promoted version's name, else None. Safe to call from cron or the server, often.
    """
    from feedback_db.promotion import auto_promote_candidate
    from training.base_models import resolve_model

    if not config.auto_promote:
        return None
    return auto_promote_candidate(store, resolve_model(config.base_model).name, policy=promotion_policy(config))
