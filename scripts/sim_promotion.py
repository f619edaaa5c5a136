"""Simulate Compare-vote campaigns and measure how often auto-promotion promotes, new rule vs old.

Each campaign is a stream of votes between a candidate and live from voters of very different
activity (a few heavy voters hit the per-voter cap), with ties, "both bad" and identical-text
votes mixed in. The decision is re-checked after EVERY vote, as the server does, until it promotes
or the campaign ends. Under the null (candidate equal to live: every decisive vote a fair coin)
the share of campaigns promoted is the false-promotion rate; with --win-rate 0.6 it is the power.

The new rule is the server's own: VoteTally.add + promotion_decision from
feedback_db/sequential_testing.py (what auto_promote_candidate calls). The old rule is the
Wilson lower bound > 0.5 after >= 30 decisive votes, re-checked each vote. --through-store N also
replays N campaigns through a real SQLite FeedbackStore calling auto_promote_candidate after each
vote, and checks that it promotes at the same vote as the in-memory rule.

    python scripts/sim_promotion.py --campaigns 1000 --max-votes 500 --win-rate 0.6 --seed 0
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feedback_db import FeedbackStore, ModelRegistry, Reply, auto_promote_candidate, wilson_interval  # noqa: E402
from feedback_db.sequential_testing import (  # noqa: E402
    PromotionPolicy,
    Vote,
    VoteTally,
    promotion_decision,
)
from training.config import _f  # noqa: E402


@dataclass(frozen=True)
class VoteStream:
    """Who votes and how, in a simulated campaign."""

    voters: int = _f(30, "Distinct voters; voter k votes with weight 1/k^activity_skew.")
    activity_skew: float = _f(1.1, "Zipf exponent of voter activity: the top voter casts ~1/4 of the votes.")
    tie_rate: float = _f(0.15, "Share of votes that are ties.")
    both_bad_rate: float = _f(0.05, "Share of votes that are 'both bad'.")
    identical_rate: float = _f(0.05, "Share of votes between two identical replies (a coin flip either way).")


def vote_stream(rng: random.Random, win_rate: float, stream: VoteStream) -> Iterator[Vote]:
    """An endless campaign of votes; decisive, non-identical votes are wins with probability `win_rate`."""
    weights = [1.0 / (k + 1) ** stream.activity_skew for k in range(stream.voters)]
    names = [f"voter-{k}" for k in range(stream.voters)]
    while True:
        voter = rng.choices(names, weights)[0]
        u = rng.random()
        if u < stream.tie_rate:
            yield Vote(voter, "tie")
        elif u < stream.tie_rate + stream.both_bad_rate:
            yield Vote(voter, "both_bad")
        elif rng.random() < stream.identical_rate:
            yield Vote(voter, "win" if rng.random() < 0.5 else "loss", identical_texts=True)
        else:
            yield Vote(voter, "win" if rng.random() < win_rate else "loss")


def first_promotion_new(votes: list[Vote], policy: PromotionPolicy) -> int | None:
    """The vote (1-based) after which the server's rule first promotes, or None."""
    tally = VoteTally()
    for i, vote in enumerate(votes, 1):
        if tally.add(vote, policy) and promotion_decision(tally, policy).promote:
            return i  # only a counted vote can change the decision
    return None


def first_promotion_old(votes: list[Vote], min_votes: int = 30) -> int | None:
    """The old rule: every decisive vote counts; promote once n >= min_votes and the Wilson low > 0.5."""
    wins = losses = 0
    for i, vote in enumerate(votes, 1):
        wins += vote.outcome == "win"
        losses += vote.outcome == "loss"
        n = wins + losses
        if n >= min_votes and wilson_interval(wins, n)[0] > 0.5:
            return i
    return None


@dataclass
class CampaignResults:
    """Where each campaign first promoted (None: never within its length)."""

    promoted_at: list[int | None]

    @property
    def rate(self) -> float:
        return sum(p is not None for p in self.promoted_at) / len(self.promoted_at)

    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the promotion rate's estimate."""
        return wilson_interval(sum(p is not None for p in self.promoted_at), len(self.promoted_at))

    def median_votes(self) -> float | None:
        hits = [p for p in self.promoted_at if p is not None]
        return statistics.median(hits) if hits else None


def run_campaigns(rule: Callable[[list[Vote]], int | None], campaigns: int, max_votes: int, win_rate: float,
                  seed: int, stream: VoteStream) -> CampaignResults:
    """`campaigns` campaigns of `max_votes` votes each (the same streams for every rule with the same seed)."""
    rng = random.Random(seed)
    results = []
    for _ in range(campaigns):
        gen = vote_stream(rng, win_rate, stream)
        results.append(rule([next(gen) for _ in range(max_votes)]))
    return CampaignResults(results)


def first_promotion_through_store(votes: list[Vote], policy: PromotionPolicy, db_path: Path) -> int | None:
    """Record `votes` in a real FeedbackStore, calling auto_promote_candidate after each one."""
    with FeedbackStore(db_path) as store:
        registry = ModelRegistry(store)
        live = registry.ensure_base_policy("sim")
        candidate = registry.register("policy-sim", adapter_path="/sim", base_model="sim",
                                      metrics={"gates_passed": True})
        rng = random.Random(0)
        for i, vote in enumerate(votes, 1):
            user = store.ensure_user(vote.voter)
            conv = store.create_conversation(user, source="compare")
            q = store.add_user_message(conv, user, f"question {i}")
            texts = [f"  the same reply {i}\n", f"the same reply {i}"] if vote.identical_texts else \
                [f"candidate reply {i}", f"live reply {i}"]
            cand_reply = store.add_reply(conv, user, q, texts[0], Reply(candidate.id))
            live_reply = store.add_reply(conv, user, q, texts[1], Reply(live.id))
            a, b = (cand_reply, live_reply) if rng.random() < 0.5 else (live_reply, cand_reply)
            choice = {"tie": "tie", "both_bad": "both_bad"}.get(vote.outcome) or \
                ("A" if (vote.outcome == "win") == (a == cand_reply) else "B")
            store.record_comparison(user, a, b, choice)
            if auto_promote_candidate(store, "sim", policy=policy):
                return i
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaigns", type=int, default=1000, help="Campaigns per scenario.")
    parser.add_argument("--max-votes", type=int, default=500, help="Votes per campaign (the rule is checked after each).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument("--win-rate", type=float, default=0.6, help="True win rate of the better candidate (power).")
    parser.add_argument("--old-min-votes", type=int, default=30, help="min_votes of the old Wilson rule.")
    parser.add_argument("--through-store", type=int, default=0,
                        help="Also replay this many null and this many better campaigns through a real SQLite store.")
    for group, cls in (("policy", PromotionPolicy), ("stream", VoteStream)):
        for f in fields(cls):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                help=f"[{group}] {f.metadata['help']}")
    args = parser.parse_args()
    policy = PromotionPolicy(**{f.name: getattr(args, f.name) for f in fields(PromotionPolicy)})
    stream = VoteStream(**{f.name: getattr(args, f.name) for f in fields(VoteStream)})

    start = time.perf_counter()
    rules = {
        f"sequential test (alpha={policy.alpha:g})": lambda votes: first_promotion_new(votes, policy),
        f"old: Wilson low > 0.5, n >= {args.old_min_votes}": lambda votes: first_promotion_old(votes, args.old_min_votes),
    }
    print(f"{args.campaigns} campaigns of {args.max_votes} votes, rule re-checked after every vote; {policy}; {stream}")
    print(f"{'rule':<36} {'false promotions [95% CI]':<26} {f'power at {args.win_rate:g}':<14} median votes to promote")
    for name, rule in rules.items():
        null = run_campaigns(rule, args.campaigns, args.max_votes, 0.5, args.seed, stream)
        better = run_campaigns(rule, args.campaigns, args.max_votes, args.win_rate, args.seed + 1, stream)
        low, high = null.interval()
        median = better.median_votes()
        print(f"{name:<36} {f'{_pct(null.rate)} [{_pct(low)}, {_pct(high)}]':<26} {_pct(better.rate):<14} "
              f"{'-' if median is None else f'{median:g}'}")
        if name.startswith("sequential"):
            new_null, new_better = null, better
    print(f"false-promotion rate: {_pct(new_null.rate)} (95% CI {_pct(new_null.interval()[0])} to "
          f"{_pct(new_null.interval()[1])}; bound alpha = {_pct(policy.alpha)})")
    print(f"power at win rate {args.win_rate:g}: {_pct(new_better.rate)} promoted within {args.max_votes} votes, "
          f"median {new_better.median_votes()} votes to promotion")
    print(f"({time.perf_counter() - start:.1f} s)")

    if args.through_store:
        agree = total = promoted = 0
        with tempfile.TemporaryDirectory() as tmp:
            for win_rate, seed in ((0.5, args.seed), (args.win_rate, args.seed + 1)):
                rng = random.Random(seed)
                for k in range(args.through_store):
                    gen = vote_stream(rng, win_rate, stream)
                    votes = [next(gen) for _ in range(args.max_votes)]
                    in_memory = first_promotion_new(votes, policy)
                    stored = first_promotion_through_store(votes, policy, Path(tmp) / f"{win_rate}-{k}.db")
                    agree += in_memory == stored
                    promoted += stored is not None
                    total += 1
        print(f"through a SQLite store with auto_promote_candidate: {agree}/{total} campaigns ended at the same "
              f"vote as the in-memory rule ({promoted} promoted, {total - promoted} never)")
        if agree != total:
            raise SystemExit("the store's rule and the in-memory rule disagree")


if __name__ == "__main__":
    main()
