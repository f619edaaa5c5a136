"""Automatic promotion of a candidate that users prefer, by a sequential test that may be checked often.

A policy candidate goes live when its round allows it (metric ``auto_promotable``: every gate
passed, or the only ones not passed are evidence gates whose intervals could not decide; candidates
of older rounds have only ``gates_passed``) and its Compare votes against the live version pass
the always-valid test of ``sequential_testing.py`` (a one-sided mixture likelihood ratio reaching
1/alpha, with at least ``min_voters`` voters and each voter's weight capped). Calling it after
every vote, from the server or from cron, keeps the chance of promoting a candidate no better than
live at most alpha.
"""

from __future__ import annotations

from dataclasses import replace

from .analytics import head_to_head_votes
from .errors import RegistryError
from .registry import ModelRegistry, ModelVersion
from .sequential_testing import PromotionEvidence, PromotionPolicy, promotion_decision, tally_votes
from .store import FeedbackStore


def promotion_evidence(store: FeedbackStore, candidate_id: int, live_id: int,
                       policy: PromotionPolicy | None = None) -> PromotionEvidence:
    """Where the test of `candidate_id` against `live_id` stands now (reads only; promotes nothing)."""
    policy = policy or PromotionPolicy()
    return promotion_decision(tally_votes(head_to_head_votes(store, candidate_id, live_id), policy), policy)


def gated_for_users(metrics: dict) -> bool:
    """Whether a candidate's round lets users' Compare votes promote it (see the module docstring)."""
    return metrics.get("auto_promotable", metrics.get("gates_passed")) is True


def promotion_candidate(store: FeedbackStore, base_model: str) -> tuple[ModelVersion, ModelVersion] | None:
    """(newest policy candidate on `base_model`, live policy), or None when either is missing."""
    registry = ModelRegistry(store)
    live = registry.live("policy")
    candidates = [c for c in registry.candidates("policy") if c.base_model in (None, base_model)]
    if live is None or not candidates:
        return None
    return candidates[0], live


def auto_promote_candidate(store: FeedbackStore, base_model: str, min_votes: int | None = None, *,
                           policy: PromotionPolicy | None = None) -> str | None:
    """Promote the newest gated policy candidate on `base_model` if the test says users prefer it
    to live; return its name, else None. Records the evidence in its metrics (``auto_promoted``).

    `min_votes`, when given, overrides ``policy.min_votes`` (the call of earlier versions).
    """
    policy = policy or PromotionPolicy()
    if min_votes is not None:
        policy = replace(policy, min_votes=min_votes)
    pair = promotion_candidate(store, base_model)
    if pair is None:
        return None
    candidate, live = pair
    if not gated_for_users(candidate.metrics):
        return None
    evidence = promotion_evidence(store, candidate.id, live.id, policy)
    if not evidence.promote:
        return None
    registry = ModelRegistry(store)
    try:
        registry.promote(candidate.id, actor="auto-promote")
    except RegistryError:
        return None  # promoted (or retired) by someone else meanwhile
    registry.update_metrics(candidate.id, {"auto_promoted": {
        **evidence.as_dict(), "against": live.name, "alpha": policy.alpha, "min_voters": policy.min_voters,
        "max_votes_per_voter": policy.max_votes_per_voter, "min_votes": policy.min_votes,
        "prior_concentration": policy.prior_concentration}})
    return candidate.name
