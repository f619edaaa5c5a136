"""Gate verdicts: passed, failed or not enough evidence, from an interval, its size and a threshold."""

from __future__ import annotations

import math

from training.evaluation import Estimate, accuracy_interval, bootstrap_interval
from training.gates import (
    FAILED,
    NOT_ENOUGH_EVIDENCE,
    PASSED,
    all_passed,
    auto_promotable,
    interval_verdict,
    missing_gate,
    point_gate,
    reward_gain_gate,
    reward_model_gate,
    reward_model_vs_previous_gate,
)


def test_interval_verdicts() -> None:
    assert interval_verdict(0.1, 0.5, 0.0) == PASSED
    assert interval_verdict(-0.5, -0.1, 0.0) == FAILED
    assert interval_verdict(-0.1, 0.5, 0.0) == NOT_ENOUGH_EVIDENCE  # straddles the threshold
    assert interval_verdict(0.0, 0.5, 0.0) == NOT_ENOUGH_EVIDENCE  # touching it is not above it
    assert interval_verdict(1.0, 2.0, 3.0, higher_is_better=False) == PASSED
    assert interval_verdict(4.0, 5.0, 3.0, higher_is_better=False) == FAILED
    assert interval_verdict(float("nan"), float("nan"), 0.0) == NOT_ENOUGH_EVIDENCE


def test_reward_gain_gate_needs_enough_held_out_prompts() -> None:
    none = reward_gain_gate(bootstrap_interval([]), 0.0, 8)
    assert none.verdict == NOT_ENOUGH_EVIDENCE and none.n == 0 and "held-out prompts: 0, need at least 8" in none.note
    assert none.to_dict()["value"] is None and none.to_dict()["ci"] == [None, None]  # plain JSON, no NaN
    few = reward_gain_gate(bootstrap_interval([1.0] * 7), 0.0, 8)  # a clear gain, on 7 prompts only
    assert few.verdict == NOT_ENOUGH_EVIDENCE and few.ci == [1.0, 1.0]


def test_reward_gain_gate_judges_the_interval() -> None:
    gains = [0.5, 0.7, 0.4, 0.6, 0.5, 0.8, 0.3, 0.6, 0.5, 0.4]
    assert reward_gain_gate(bootstrap_interval(gains), 0.0, 8).verdict == PASSED
    assert reward_gain_gate(bootstrap_interval([-g for g in gains]), 0.0, 8).verdict == FAILED
    mixed = reward_gain_gate(bootstrap_interval([g - 0.5 for g in gains]), 0.0, 8)
    assert mixed.verdict == NOT_ENOUGH_EVIDENCE and mixed.ci[0] < 0 < mixed.ci[1]
    assert mixed.note == "the 95% interval contains the threshold"


def test_reward_model_gate_with_too_few_pairs_is_not_enough_evidence() -> None:
    perfect = accuracy_interval([True] * 5)  # 5 of 5: Wilson lower bound 0.57, above the floor ...
    assert perfect.low > 0.55
    gate = reward_model_gate(perfect, 0.55, 20)  # ... but 5 pairs are fewer than 20
    assert gate.verdict == NOT_ENOUGH_EVIDENCE and gate.n == 5 and "held-out pairs: 5" in gate.note
    assert reward_model_gate(accuracy_interval([True] * 18 + [False] * 2), 0.55, 20).verdict == PASSED
    assert reward_model_gate(accuracy_interval([True] * 8 + [False] * 22), 0.55, 20).verdict == FAILED
    assert reward_model_gate(accuracy_interval([True] * 13 + [False] * 7), 0.55, 20).verdict == NOT_ENOUGH_EVIDENCE


def test_reward_model_vs_previous_fails_only_when_clearly_worse() -> None:
    same = bootstrap_interval([0] * 30)
    assert reward_model_vs_previous_gate(same, 0.02, 20).verdict == PASSED
    worse = bootstrap_interval([-1] * 10 + [0] * 20)  # wrong on a third of the pairs the previous got right
    assert reward_model_vs_previous_gate(worse, 0.02, 20).verdict == FAILED
    noisy = bootstrap_interval([-1, 1] * 15)
    assert reward_model_vs_previous_gate(noisy, 0.02, 20).verdict == NOT_ENOUGH_EVIDENCE


def test_point_gates_and_all_passed() -> None:
    assert point_gate(3.0, 10.0).verdict == PASSED and point_gate(11.0, 10.0).verdict == FAILED
    assert point_gate(float("nan"), 10.0).verdict == NOT_ENOUGH_EVIDENCE
    gates = {"kl": point_gate(3.0, 10.0).to_dict(), "reward_gain": reward_gain_gate(Estimate(1.0, 0.5, 1.5, 10), 0.0, 8).to_dict()}
    assert all_passed(gates)
    gates["judge"] = missing_gate(0.0, "no judge").to_dict()
    assert not all_passed(gates) and gates["judge"]["verdict"] == NOT_ENOUGH_EVIDENCE
    assert all_passed({})  # an SFT-only round has no gates: the Compare votes decide
    assert math.isnan(point_gate(float("nan"), 1.0).value) and point_gate(float("nan"), 1.0).to_dict()["value"] is None


def test_auto_promotable_lets_users_settle_only_undecided_evidence_gates() -> None:
    undecided = reward_gain_gate(bootstrap_interval([-1.0, 1.0] * 8), 0.0, 8)  # 16 prompts, mean 0
    assert undecided.verdict == NOT_ENOUGH_EVIDENCE and undecided.undecided
    few = reward_gain_gate(bootstrap_interval([1.0] * 7), 0.0, 8)  # too few prompts: not undecided
    assert few.verdict == NOT_ENOUGH_EVIDENCE and not few.undecided
    worse = reward_gain_gate(bootstrap_interval([-1.0, -0.5] * 8), 0.0, 8)
    rm_undecided = reward_model_gate(accuracy_interval([True] * 13 + [False] * 7), 0.55, 20)  # 0.65 [0.43, 0.82]
    assert rm_undecided.verdict == NOT_ENOUGH_EVIDENCE and rm_undecided.undecided
    kl_ok, kl_bad = point_gate(3.0, 10.0).to_dict(), point_gate(12.0, 10.0).to_dict()
    assert not point_gate(float("nan"), 10.0).undecided  # not measured is not "undecided"

    def gates(**named: object) -> dict:
        return {name: g.to_dict() if hasattr(g, "to_dict") else g for name, g in named.items()}

    assert auto_promotable(gates(reward_gain=undecided, reward_model=rm_undecided, kl=kl_ok))
    assert not auto_promotable(gates(reward_gain=undecided, kl=kl_ok), users_settle_undecided=False)
    assert not all_passed(gates(reward_gain=undecided, kl=kl_ok))
    assert not auto_promotable(gates(reward_gain=few, kl=kl_ok))  # too few held-out prompts always blocks
    assert not auto_promotable(gates(reward_gain=worse, kl=kl_ok))  # failed blocks
    assert not auto_promotable(gates(reward_gain=undecided, kl=kl_bad))  # KL is never left to the users
    assert not auto_promotable(gates(reward_gain=missing_gate(0.0, "no judge"), kl=kl_ok))
    assert not auto_promotable(gates(kl=dict(kl_ok, verdict=NOT_ENOUGH_EVIDENCE, undecided=True)))  # not an evidence gate
