"""Promotion as a sequential test: "users prefer the candidate", valid however often it is checked.

The question, after every Compare vote between the candidate and the live version, is whether the
candidate's win probability ``p`` (among decisive votes) is above 1/2. Re-computing a fixed-sample
test (a Wilson bound) after every vote is not a test at level alpha: each look is another chance
to cross the bound by luck, and with hundreds of looks a candidate equal to live gets promoted far
more often than alpha (``scripts/sim_promotion.py`` measures it). Here the evidence is a
nonnegative martingale under the null, so by Ville's inequality its chance of EVER reaching
``1/alpha`` is at most alpha, whatever the number of looks and whenever we stop.

The statistic: a one-sided mixture likelihood ratio (Robbins 1970, "Statistical methods related to
the law of the iterated logarithm"; Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), the one-sided
beta-binomial mixture). With ``S`` wins and ``F`` losses among the counted decisive votes,
``n = S + F``, and a prior ``pi`` = Beta(a, a) restricted to ``p >= 1/2``::

    M_n = integral over p of  p^S (1-p)^F / (1/2)^n  d pi(p)                                (1)
        = 2^(n+1) * B(a+S, a+F) / B(a, a) * P(Beta(a+S, a+F) > 1/2)                        (2)

(2) uses that the symmetric Beta(a, a) puts half its mass above 1/2. For integer parameters,
``P(Beta(x, y) > 1/2) = P(Binomial(x+y-1, 1/2) <= x-1)``. Under the null ``p = 1/2`` every
likelihood ratio ``prod (2p)^X (2(1-p))^(1-X)`` is a martingale with mean 1, so their mixture
``M_n`` is too (``M_n`` = the average of its two possible next values); Ville (1939):
``P(sup_n M_n >= 1/alpha) <= alpha``. Promote when ``M_n >= 1/alpha``: ``M_n`` is an e-value.

Which votes count (each rule keeps ``M`` a martingale in the vote-by-vote filtration, because
whether a vote counts is known before its outcome, or is the outcome "not decisive" itself, so
Doob's optional skipping theorem applies):

* Only decisive votes (the candidate's reply won or lost). Ties and "both bad" say nothing about
  which is better; the null is "P(candidate wins | the vote is decisive) = 1/2" (a sign test).
* Votes between identical texts (equal after ``strip()``) are ignored: the voter could not have
  preferred one model's reply, so such a vote is noise about a coin the models did not toss.
* A second vote on the same pair of replies is ignored: it repeats a judgement already counted.
* At most ``max_votes_per_voter`` votes of each voter count: that voter's FIRST ones. The first k
  are decided before their outcomes are seen. Counting each voter's latest k instead would slide a
  window over an endless stream, which sooner or later fills with wins by chance (invalid);
  weighting a voter's votes by 1/(their total) changes past weights as they vote again (invalid
  too). The cap bounds how much one person's taste (or one person voting 1,000 times) can move
  the decision.
* ``min_voters`` distinct voters and ``min_votes`` counted votes are extra conditions for
  promoting: they only shrink the rejection event, so the error bound still holds.

Alpha is per candidate: of many candidates no better than live, at most a share alpha get promoted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal

Outcome = Literal["win", "loss", "tie", "both_bad"]
OUTCOMES: tuple[str, ...] = ("win", "loss", "tie", "both_bad")


def _f(default: Any, help_text: str) -> Any:
    """A dataclass field with a default and a one-line help text (training/config.py's `_f`; feedback_db
    cannot import training)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class PromotionPolicy:
    """When a gated candidate goes live on users' Compare votes against the live version."""

    alpha: float = _f(0.05, "Chance of promoting a candidate that is no better than live, however often it is checked.")
    min_voters: int = _f(5, "Distinct voters with a counted vote before promotion is possible.")
    max_votes_per_voter: int = _f(20, "Counted votes per voter (their first ones): bounds one person's weight.")
    min_votes: int = _f(0, "Counted decisive votes before promotion is possible (the test is valid at any count).")
    prior_concentration: int = _f(
        4, "a of the Beta(a, a) prior on the win rate, kept above 1/2: larger tunes the test to smaller advantages.")

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1 (e.g. 0.05), not {self.alpha}.")
        if self.min_voters < 1 or self.max_votes_per_voter < 1 or self.min_votes < 0:
            raise ValueError("min_voters and max_votes_per_voter must be at least 1, min_votes at least 0.")
        if self.prior_concentration < 1 or int(self.prior_concentration) != self.prior_concentration:
            raise ValueError(f"prior_concentration must be a whole number >= 1 (e.g. 4), not {self.prior_concentration}.")

    @property
    def threshold(self) -> float:
        """The e-value that rejects "no better than live": 1/alpha (Ville's inequality)."""
        return 1.0 / self.alpha


@dataclass(frozen=True)
class Vote:
    """One Compare vote between the candidate and the live version, from the candidate's side."""

    voter: str
    outcome: Outcome
    identical_texts: bool = False  # both replies had the same text (after strip)
    pair: tuple[int, int] | None = None  # the two replies' ids, smaller first; None: not known (never repeated)


# --------------------------------------------------------------------------- #
# The statistic
# --------------------------------------------------------------------------- #


def log_binomial_half_cdf(k: int, n: int) -> float:
    """log P(Binomial(n, 1/2) <= k), summed from k away from the mode until the terms stop mattering."""
    if k < 0:
        return -math.inf
    if k >= n:
        return 0.0

    def log_pmf(j: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2)

    if 2 * k < n:  # lower tail, relative to pmf(k) (no underflow): pmf(j-1)/pmf(j) = j/(n-j+1)
        term, total = 1.0, 1.0
        for j in range(k, 0, -1):
            term *= j / (n - j + 1)
            total += term
            if term < total * 1e-17:
                break
        return log_pmf(k) + math.log(total)
    term = math.exp(log_pmf(k + 1))  # upper tail from k+1: pmf(j+1)/pmf(j) = (n-j)/(j+1)
    upper = term
    for j in range(k + 1, n):
        term *= (n - j) / (j + 1)
        upper += term
        if term < upper * 1e-17:
            break
    return math.log1p(-upper)


@lru_cache(maxsize=1 << 17)
def log_mixture_likelihood_ratio(wins: int, losses: int, concentration: int = 4) -> float:
    """log M_n of eq. (2) in the module docstring: the one-sided Beta(a, a)-mixture likelihood ratio
    of "win probability p >= 1/2" against "p = 1/2" after `wins` wins and `losses` losses.

    E.g. a = 1 (uniform prior on [1/2, 1]): one win gives M = 1.5, one loss M = 0.5, two wins 7/3.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be counts >= 0, not {wins} and {losses}.")
    a = concentration
    n = wins + losses

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    log_upper_mass = log_binomial_half_cdf(a + wins - 1, 2 * a + n - 1)  # log P(Beta(a+S, a+F) > 1/2)
    return (n + 1) * math.log(2) + log_beta(a + wins, a + losses) - log_beta(a, a) + log_upper_mass


def mixture_likelihood_ratio(wins: int, losses: int, concentration: int = 4) -> float:
    """M_n of eq. (2): the e-value for "the candidate wins more than half its decisive votes"
    (``inf`` past the largest float, after about a thousand straight wins)."""
    log_m = log_mixture_likelihood_ratio(wins, losses, concentration)
    return math.exp(log_m) if log_m < 709.0 else math.inf


# --------------------------------------------------------------------------- #
# Which votes count, and the decision
# --------------------------------------------------------------------------- #


@dataclass
class VoteTally:
    """The counted votes of a campaign so far; `add` applies the counting rules of the module docstring."""

    wins: int = 0
    losses: int = 0
    per_voter: dict[str, int] = field(default_factory=dict)  # counted votes per voter
    not_decisive: int = 0  # ties and both_bad
    identical_texts: int = 0
    repeated_pairs: int = 0
    over_cap: int = 0  # decisive votes beyond a voter's max_votes_per_voter
    _pairs: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def add(self, vote: Vote, policy: PromotionPolicy) -> bool:
        """Count `vote` if the rules allow; return whether it counted."""
        if vote.outcome not in OUTCOMES:
            raise ValueError(f"a vote's outcome is one of {', '.join(OUTCOMES)}, not {vote.outcome!r}.")
        if vote.identical_texts:
            self.identical_texts += 1
            return False
        if vote.pair is not None:
            if vote.pair in self._pairs:
                self.repeated_pairs += 1
                return False
            self._pairs.add(vote.pair)
        if vote.outcome in ("tie", "both_bad"):
            self.not_decisive += 1
            return False
        if self.per_voter.get(vote.voter, 0) >= policy.max_votes_per_voter:
            self.over_cap += 1
            return False
        self.per_voter[vote.voter] = self.per_voter.get(vote.voter, 0) + 1
        if vote.outcome == "win":
            self.wins += 1
        else:
            self.losses += 1
        return True

    @property
    def voters(self) -> int:
        """Distinct voters with at least one counted vote."""
        return len(self.per_voter)


def tally_votes(votes: Iterable[Vote], policy: PromotionPolicy) -> VoteTally:
    """The tally of `votes`, given in the order they were cast (oldest first)."""
    tally = VoteTally()
    for vote in votes:
        tally.add(vote, policy)
    return tally


@dataclass(frozen=True)
class PromotionEvidence:
    """The state of the sequential test: what the decision to promote (or not) rests on."""

    wins: int
    losses: int
    voters: int
    e_value: float  # M_n of eq. (2); promote when >= threshold
    threshold: float  # 1 / alpha
    promote: bool
    reason: str  # why it promotes or not, for people
    ignored: dict[str, int] = field(default_factory=dict)  # votes not counted, by rule

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the record kept in the promoted version's metrics)."""
        return asdict(self)


def promotion_decision(tally: VoteTally, policy: PromotionPolicy) -> PromotionEvidence:
    """Promote iff at least `min_voters` voters and `min_votes` counted votes, and M_n >= 1/alpha."""
    e_value = mixture_likelihood_ratio(tally.wins, tally.losses, policy.prior_concentration)
    n = tally.wins + tally.losses
    promote = False
    if tally.voters < policy.min_voters:
        reason = f"{tally.voters} of the {policy.min_voters} voters needed so far"
    elif n < policy.min_votes:
        reason = f"{n} of the {policy.min_votes} counted votes needed so far"
    elif e_value < policy.threshold:
        reason = f"evidence {e_value:.3g} is below the threshold {policy.threshold:.3g}"
    else:
        promote = True
        reason = f"evidence {e_value:.3g} reached the threshold {policy.threshold:.3g}"
    ignored = {"not_decisive": tally.not_decisive, "identical_texts": tally.identical_texts,
               "repeated_pairs": tally.repeated_pairs, "over_cap": tally.over_cap}
    return PromotionEvidence(tally.wins, tally.losses, tally.voters, e_value, policy.threshold, promote, reason,
                             ignored)
