"""Auto-promotion as an always-valid sequential test: the statistic on hand-computed numbers, the
counting rules on hand-made vote streams (pure and through a real SQLite store), and a small
simulation showing the false-promotion rate stays below alpha when the rule is checked after every vote."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from feedback_db import FeedbackStore, ModelRegistry, Reply
from feedback_db.promotion import auto_promote_candidate, promotion_evidence
from feedback_db.sequential_testing import (
    PromotionPolicy,
    Vote,
    log_binomial_half_cdf,
    mixture_likelihood_ratio,
    promotion_decision,
    tally_votes,
)
from scripts.sim_promotion import VoteStream, first_promotion_new, first_promotion_old, run_campaigns

# --------------------------------------------------------------------------- #
# The statistic
# --------------------------------------------------------------------------- #


def test_binomial_half_cdf_matches_counting() -> None:
    # P(Bin(6, 1/2) <= k) = (C(6,0) + ... + C(6,k)) / 64
    for k, count in [(0, 1), (1, 7), (2, 22), (3, 42), (4, 57), (5, 63)]:
        assert math.exp(log_binomial_half_cdf(k, 6)) == pytest.approx(count / 64, rel=1e-12)
    assert log_binomial_half_cdf(-1, 6) == -math.inf and log_binomial_half_cdf(6, 6) == 0.0
    # deep lower tail, far below the smallest float: still exact in log space
    exact = math.log(sum(math.comb(2000, j) for j in range(11))) - 2000 * math.log(2)
    assert log_binomial_half_cdf(10, 2000) == pytest.approx(exact, rel=1e-12)


def test_mixture_likelihood_ratio_matches_the_integrals() -> None:
    # a = 1: prior density 2 on [1/2, 1]; M = 2^n * integral_{1/2}^1 2 p^S (1-p)^F dp
    assert mixture_likelihood_ratio(0, 0, 1) == pytest.approx(1.0)
    assert mixture_likelihood_ratio(1, 0, 1) == pytest.approx(1.5)  # 2 * 2 * (1 - 1/4) / 2
    assert mixture_likelihood_ratio(0, 1, 1) == pytest.approx(0.5)  # 2 * 2 * 1/8
    assert mixture_likelihood_ratio(2, 0, 1) == pytest.approx(7 / 3)  # 4 * 2 * (1 - 1/8) / 3
    assert mixture_likelihood_ratio(1, 1, 1) == pytest.approx(2 / 3)  # 4 * 2 * (1/6 - 1/12)
    # a = 2: density 12 p (1-p) on [1/2, 1]; one win: 2 * 12 * (1/12 - 5/192) = 1.375
    assert mixture_likelihood_ratio(1, 0, 2) == pytest.approx(1.375)
    # S straight wins, a = 1: (2^(S+1) - 1) / (S + 1): 6 wins 18.1 < 20 <= 31.9 for 7
    assert mixture_likelihood_ratio(6, 0, 1) == pytest.approx(127 / 7)
    assert mixture_likelihood_ratio(7, 0, 1) == pytest.approx(255 / 8)
    assert mixture_likelihood_ratio(5000, 0, 4) == math.inf  # past the largest float, not an error


@pytest.mark.parametrize("wins,losses,a", [(0, 0, 1), (3, 5, 1), (10, 4, 4), (100, 90, 8), (5, 300, 4), (40, 2, 16)])
def test_mixture_likelihood_ratio_is_a_martingale_under_the_null(wins: int, losses: int, a: int) -> None:
    """Under p = 1/2 the expected next value equals the current one (what Ville's inequality needs)."""
    now = mixture_likelihood_ratio(wins, losses, a)
    expected_next = (mixture_likelihood_ratio(wins + 1, losses, a) + mixture_likelihood_ratio(wins, losses + 1, a)) / 2
    assert expected_next == pytest.approx(now, rel=1e-9)


def test_policy_rejects_nonsense_with_a_fix() -> None:
    with pytest.raises(ValueError, match="alpha"):
        PromotionPolicy(alpha=1.5)
    with pytest.raises(ValueError, match="whole number"):
        PromotionPolicy(prior_concentration=2.5)  # type: ignore[arg-type]
    assert PromotionPolicy(alpha=0.05).threshold == pytest.approx(20)


# --------------------------------------------------------------------------- #
# Which votes count (pure)
# --------------------------------------------------------------------------- #

POLICY = PromotionPolicy(alpha=0.05, min_voters=5, max_votes_per_voter=20, prior_concentration=4)


def _wins(voters: int, each: int) -> list[Vote]:
    return [Vote(f"v{i}", "win") for _ in range(each) for i in range(voters)]


def test_a_clear_winner_is_promoted_once_the_evidence_reaches_one_over_alpha() -> None:
    votes = _wins(5, 2)  # 10 straight wins from 5 voters
    assert mixture_likelihood_ratio(9, 0, 4) < 20 <= mixture_likelihood_ratio(10, 0, 4)
    assert not promotion_decision(tally_votes(votes[:9], POLICY), POLICY).promote
    evidence = promotion_decision(tally_votes(votes, POLICY), POLICY)
    assert evidence.promote and (evidence.wins, evidence.losses, evidence.voters) == (10, 0, 5)
    assert evidence.e_value == pytest.approx(mixture_likelihood_ratio(10, 0, 4)) and evidence.threshold == 20
    assert first_promotion_new(votes, POLICY) == 10


def test_one_voter_casting_a_thousand_votes_never_promotes() -> None:
    votes = [Vote("fan", "win") for _ in range(1000)]
    evidence = promotion_decision(tally_votes(votes, POLICY), POLICY)
    assert not evidence.promote and evidence.voters == 1
    assert (evidence.wins, evidence.ignored["over_cap"]) == (20, 980)  # the first 20 count, the rest do not
    # ... nor do they outweigh four other voters: 4 x 20 losses then the fan's 1000 wins
    mixed = [Vote(f"critic{i}", "loss") for i in range(4) for _ in range(20)] + votes
    assert first_promotion_new(mixed, POLICY) is None


def test_min_voters_is_respected() -> None:
    four = _wins(4, 20)  # 80 straight wins, overwhelming evidence, but only 4 voters
    evidence = promotion_decision(tally_votes(four, POLICY), POLICY)
    assert evidence.e_value > 1e6 and not evidence.promote and "voters" in evidence.reason
    assert promotion_decision(tally_votes(four + [Vote("fifth", "win")], POLICY), POLICY).promote
    strict = PromotionPolicy(min_voters=5, min_votes=30)
    assert not promotion_decision(tally_votes(_wins(5, 5), strict), strict).promote  # 25 < min_votes
    assert promotion_decision(tally_votes(_wins(5, 6), strict), strict).promote


def test_identical_texts_ties_and_repeated_pairs_are_not_counted() -> None:
    base = _wins(5, 1)  # 5 wins: e-value below 20
    noise = ([Vote(f"v{i}", "win", identical_texts=True) for i in range(5)] * 4
             + [Vote(f"v{i}", "tie") for i in range(5)] + [Vote(f"v{i}", "both_bad") for i in range(5)]
             + [Vote("v0", "win", pair=(1, 2))] * 3)
    tally = tally_votes(base + noise, POLICY)
    assert (tally.wins, tally.losses) == (6, 0)  # the first vote on pair (1, 2) counts, its repeats do not
    assert (tally.identical_texts, tally.not_decisive, tally.repeated_pairs) == (20, 10, 2)
    assert not promotion_decision(tally, POLICY).promote


# --------------------------------------------------------------------------- #
# Through a real store: only candidate vs live, gates, evidence recorded
# --------------------------------------------------------------------------- #


def _compare(store: FeedbackStore, user: str, winner_id: int, loser_id: int, *, texts: tuple[str, str] = ("x", "y"),
             choice: str | None = None) -> None:
    user = store.ensure_user(user)
    conv = store.create_conversation(user, source="compare")
    q = store.add_user_message(conv, user, "Compare these")
    a = store.add_reply(conv, user, q, texts[0], Reply(winner_id))
    b = store.add_reply(conv, user, q, texts[1], Reply(loser_id))
    store.record_comparison(user, b, a, choice or "B")  # the winner on the right


def test_store_promotes_a_gated_candidate_users_prefer_and_records_the_evidence(tmp_db_path: Path) -> None:
    with FeedbackStore(tmp_db_path) as store:
        registry = ModelRegistry(store)
        live = registry.ensure_base_policy("tiny")
        other = registry.register("policy-other", base_model="tiny", metrics={"gates_passed": False})
        candidate = registry.register("policy-new", base_model="tiny", metrics={"gates_passed": True})
        for i in range(5):
            _compare(store, f"u{i}", candidate.id, other.id)  # not against live: ignored
            _compare(store, f"u{i}", candidate.id, live.id, texts=("same  ", " same"))  # identical texts
            _compare(store, f"u{i}", candidate.id, live.id, choice="tie")
        assert promotion_evidence(store, candidate.id, live.id, POLICY).wins == 0
        for k in range(9):
            _compare(store, f"u{k % 5}", candidate.id, live.id)
            assert auto_promote_candidate(store, "tiny", policy=POLICY) is None
        before = promotion_evidence(store, candidate.id, live.id, POLICY)  # read-only, the dashboard's view
        assert (before.wins, before.voters, before.promote) == (9, 5, False)
        assert before.ignored == {"not_decisive": 5, "identical_texts": 5, "repeated_pairs": 0, "over_cap": 0}
        _compare(store, "u4", candidate.id, live.id)
        assert auto_promote_candidate(store, "tiny", policy=POLICY) == "policy-new"
        assert registry.live().name == "policy-new"
        record = registry.get("policy-new").metrics["auto_promoted"]
        assert (record["wins"], record["losses"], record["voters"], record["threshold"]) == (10, 0, 5, 20)
        assert record["e_value"] == pytest.approx(mixture_likelihood_ratio(10, 0, 4))
        assert record["against"] == "base:tiny" and record["alpha"] == 0.05
        assert auto_promote_candidate(store, "tiny", policy=POLICY) is None  # nothing left to promote


def test_store_never_promotes_a_candidate_whose_gates_did_not_pass(tmp_db_path: Path) -> None:
    with FeedbackStore(tmp_db_path) as store:
        registry = ModelRegistry(store)
        live = registry.ensure_base_policy("tiny")
        for gates in (False, None):  # failed, or "not enough evidence" (no gates_passed = True)
            metrics = {} if gates is None else {"gates_passed": gates}
            candidate = registry.register(f"policy-{gates}", base_model="tiny", metrics=metrics)
            for k in range(40):
                _compare(store, f"u{k % 8}", candidate.id, live.id)
            assert promotion_evidence(store, candidate.id, live.id, POLICY).promote  # the votes alone would
            assert auto_promote_candidate(store, "tiny", policy=POLICY) is None
            assert registry.live().name == "base:tiny"


def test_the_rounds_auto_promotable_verdict_decides_over_gates_passed(tmp_db_path: Path) -> None:
    with FeedbackStore(tmp_db_path) as store:
        registry = ModelRegistry(store)
        live = registry.ensure_base_policy("tiny")
        blocked = registry.register("policy-blocked", base_model="tiny",
                                    metrics={"gates_passed": True, "auto_promotable": False})
        for k in range(40):
            _compare(store, f"u{k % 8}", blocked.id, live.id)
        assert auto_promote_candidate(store, "tiny", policy=POLICY) is None
        registry.retire(blocked.id)
        undecided = registry.register("policy-undecided", base_model="tiny",  # an evidence gate could not tell
                                      metrics={"gates_passed": False, "auto_promotable": True})
        for k in range(40):
            _compare(store, f"u{k % 8}", undecided.id, live.id)
        assert auto_promote_candidate(store, "tiny", policy=POLICY) == "policy-undecided"


def test_min_votes_keeps_the_old_call_working(tmp_db_path: Path) -> None:
    with FeedbackStore(tmp_db_path) as store:
        registry = ModelRegistry(store)
        live = registry.ensure_base_policy("tiny")
        candidate = registry.register("policy-new", base_model="tiny", metrics={"gates_passed": True})
        for k in range(11):
            _compare(store, f"u{k % 5}", candidate.id, live.id)
        assert auto_promote_candidate(store, "tiny", 12) is None  # 11 counted votes < min_votes
        _compare(store, "u0", candidate.id, live.id)
        assert auto_promote_candidate(store, "tiny", min_votes=12) == "policy-new"


# --------------------------------------------------------------------------- #
# Checked after every vote: the false-promotion rate stays below alpha
# --------------------------------------------------------------------------- #


def test_false_promotion_rate_stays_below_alpha_when_checked_after_every_vote() -> None:
    """200 campaigns of 200 votes under the null; the new rule stays under alpha, the old one does not."""
    stream = VoteStream()
    new = run_campaigns(lambda v: first_promotion_new(v, POLICY), 200, 200, 0.5, seed=1, stream=stream)
    old = run_campaigns(first_promotion_old, 200, 200, 0.5, seed=1, stream=stream)
    assert new.rate <= POLICY.alpha + 0.02  # true rate <= 0.05; 0.07 is > 1.2 binomial sd above it
    assert old.interval()[0] > POLICY.alpha  # the old rule's rate is significantly above 5%
    assert run_campaigns(lambda v: first_promotion_new(v, POLICY), 50, 400, 0.75, seed=2, stream=stream).rate > 0.9
