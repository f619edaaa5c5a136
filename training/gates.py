"""A candidate's gates: each offline check's verdict before it may be auto-promoted."""

from __future__ import annotations

from typing import Any


def evaluate_gates(metrics: dict[str, Any], config: Any) -> dict[str, bool]:
    """Each gate's verdict on a PPO candidate's evaluation metrics."""
    return {
        "kl": metrics["kl_to_reference"] <= config.max_kl,
        "reward_gain": metrics["reward_gain"] > config.min_reward_gain,
        "ptx_perplexity": metrics["ptx_ppl_increase"] <= config.max_ptx_ppl_increase,
    }
