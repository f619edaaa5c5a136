"""A round's gates: each offline check's verdict, judged on an interval, before a candidate may be
auto-promoted.

Every gate ends in one of three verdicts:

* ``passed``: the whole 95% interval is on the good side of the threshold (for a minimum, its
  lower bound is above it; for a maximum, its upper bound is below it);
* ``failed``: the whole interval is on the bad side;
* ``not enough evidence``: the interval straddles the threshold, or it was computed on fewer
  units (held-out prompts or pairs) than the configured minimum, or there is nothing to judge
  with (no held-out prompts, no independent judge).

A candidate's ``gates_passed`` is True only when every gate passed. Auto-promotion asks less of
the evidence gates (``auto_promotable``): when a reward model's accuracy or the judge's reward
gain was measured on enough held-out units but its interval straddles the threshold
(``undecided``), the offline evidence cannot tell, and the users' Compare votes, the sequential
test that promotes at most ``alpha`` of the candidates no better than live, decide. A failed gate,
too few units, a missing judge, and the KL and ptx-perplexity gates always block.

Gates measured without an interval (the KL at the end of PPO, the ptx perplexity change) are
compared as points. A gate is stored as ``{"verdict", "value", "ci", "n",
"threshold", "note", "undecided"}`` in the round's metrics, under ``gates``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from training.evaluation import Estimate, json_number

PASSED = "passed"
FAILED = "failed"
NOT_ENOUGH_EVIDENCE = "not enough evidence"
VERDICTS = (PASSED, FAILED, NOT_ENOUGH_EVIDENCE)


@dataclass
class Gate:
    """One gate's verdict, the value it judged, its 95% interval (None for a point), units and threshold."""

    verdict: str
    value: float | None
    ci: list[float] | None
    n: int | None
    threshold: float
    note: str = ""
    undecided: bool = False  # enough units, but the interval contains the threshold

    def to_dict(self) -> dict[str, Any]:
        """As stored in the round's metrics (NaN becomes None: plain JSON)."""
        ci = [json_number(x) for x in self.ci] if self.ci is not None else None
        return {"verdict": self.verdict, "value": json_number(self.value), "ci": ci, "n": self.n,
                "threshold": self.threshold, "note": self.note, "undecided": self.undecided}


def interval_verdict(low: float, high: float, threshold: float, *, higher_is_better: bool = True) -> str:
    """passed / failed / not enough evidence for an interval against a threshold (see the module docstring)."""
    if math.isnan(low) or math.isnan(high):
        return NOT_ENOUGH_EVIDENCE
    good, bad = (low > threshold, high < threshold) if higher_is_better else (high < threshold, low > threshold)
    return PASSED if good else FAILED if bad else NOT_ENOUGH_EVIDENCE


def interval_gate(estimate: Estimate, threshold: float, min_n: int, unit: str, *,
                  higher_is_better: bool = True) -> Gate:
    """A gate on an estimate with an interval: too few ``unit``s is not enough evidence, whatever the interval."""
    ci = [estimate.low, estimate.high]
    if estimate.n < min_n:
        return Gate(NOT_ENOUGH_EVIDENCE, estimate.value, ci, estimate.n, threshold,
                    f"held-out {unit}: {estimate.n}, need at least {min_n}")
    verdict = interval_verdict(estimate.low, estimate.high, threshold, higher_is_better=higher_is_better)
    undecided = verdict == NOT_ENOUGH_EVIDENCE and not (math.isnan(estimate.low) or math.isnan(estimate.high))
    note = ("the 95% interval contains the threshold" if undecided else
            "no interval could be computed" if verdict == NOT_ENOUGH_EVIDENCE else "")
    return Gate(verdict, estimate.value, ci, estimate.n, threshold, note, undecided)


def point_gate(value: float, maximum: float, *, n: int | None = None) -> Gate:
    """A gate on a single measured value that must not exceed ``maximum`` (NaN: not enough evidence)."""
    if math.isnan(value):
        return Gate(NOT_ENOUGH_EVIDENCE, value, None, n, maximum, "not measured")
    return Gate(PASSED if value <= maximum else FAILED, value, None, n, maximum)


def missing_gate(threshold: float, note: str) -> Gate:
    """A gate that could not be judged at all (e.g. no independent judge): not enough evidence."""
    return Gate(NOT_ENOUGH_EVIDENCE, None, None, 0, threshold, note)


def reward_model_gate(accuracy: Estimate, floor: float, min_pairs: int) -> Gate:
    """The new reward model's held-out pairwise accuracy (Wilson interval) against ``floor``."""
    return interval_gate(accuracy, floor, min_pairs, "pairs")


def reward_model_vs_previous_gate(difference: Estimate, tolerance: float, min_pairs: int) -> Gate:
    """The new reward model's accuracy minus the previous one's on the same held-out pairs (bootstrap
    interval) against ``-tolerance``: failed when the new one is clearly worse by more than that."""
    return interval_gate(difference, -tolerance, min_pairs, "pairs")


def reward_gain_gate(gain: Estimate, min_gain: float, min_prompts: int) -> Gate:
    """The judge's reward of the candidate minus live, paired per held-out prompt (bootstrap interval),
    against ``min_gain``."""
    return interval_gate(gain, min_gain, min_prompts, "prompts")


def all_passed(gates: dict[str, dict[str, Any]]) -> bool:
    """True when every gate's verdict is 'passed' (and vacuously when there are none)."""
    return all(g["verdict"] == PASSED for g in gates.values())


EVIDENCE_GATES = ("reward_model", "reward_model_vs_previous", "reward_gain")


def auto_promotable(gates: dict[str, dict[str, Any]], *, users_settle_undecided: bool = True) -> bool:
    """True when the users' Compare votes may promote the candidate (see the module docstring): every
    gate passed, or, with `users_settle_undecided`, an evidence gate (EVIDENCE_GATES) is undecided."""
    def ok(name: str, gate: dict[str, Any]) -> bool:
        return gate["verdict"] == PASSED or (users_settle_undecided and name in EVIDENCE_GATES
                                             and gate.get("undecided") is True)
    return all(ok(name, gate) for name, gate in gates.items())
