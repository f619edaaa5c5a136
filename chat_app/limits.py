"""Request limits, and the error type whose message the UI shows as is.

Limits are charged to every key a request has (the user's identity and the client's address), in
units of what the request costs: a chat reply costs 1, a Compare battle 2, a Rank of K replies K.
A stranger who opens new sessions gets new identities, but not a new address.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class UserFacingError(Exception):
    """A refusal the user should read (rate limit, input too long, engine down...)."""


class RateLimited(UserFacingError):
    """A limit is reached; the message says how long to wait (HTTP 429 in the API)."""


@dataclass
class LimitConfig:
    """Budgets per sliding minute (0: no limit)."""

    generations_per_user: int = 30  # generated replies per identity
    generations_per_address: int = 120  # per client address (several users may share one)
    feedback_per_user: int = 60  # ratings, votes, rankings and demonstrations per identity
    feedback_per_address: int = 240

    @classmethod
    def scaled(cls, generations_per_user: int) -> LimitConfig:
        """The defaults' proportions from one number (`serve --rate-limit N`; 0: no limits at all):
        an address gets 4 users' worth, and feedback twice the generations."""
        n = generations_per_user
        return cls(generations_per_user=n, generations_per_address=4 * n, feedback_per_user=2 * n,
                   feedback_per_address=8 * n)


class RateLimiter:
    """Sliding 60-second windows per key, each key with its own budget.

    A request is charged to several keys at once (identity and address) and is refused, with
    nothing charged, if any key lacks room. Keys idle for a minute are forgotten, so the map
    holds only the last minute's clients.
    """

    def __init__(self, what: str = "requests", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._last_prune = clock()

    def __len__(self) -> int:
        return len(self._hits)

    def check(self, budgets: dict[str, int], cost: int = 1) -> None:
        """Charge `cost` units to every key in `budgets` (key -> units a minute; 0: no limit), or raise
        UserFacingError saying when to retry, with nothing charged."""
        budgets = {key: limit for key, limit in budgets.items() if limit > 0}
        if not budgets:
            return
        now = self._clock()
        with self._lock:
            self._prune(now)
            windows = []
            for key, limit in budgets.items():
                hits = self._hits.setdefault(key, deque())
                while hits and now - hits[0] >= 60.0:
                    hits.popleft()
                if cost > limit:
                    raise RateLimited(f"That request costs {cost} {self.what}; the limit is {limit} a minute. "
                                          "Ask for fewer.")
                if len(hits) + cost > limit:
                    free_at = hits[len(hits) + cost - limit - 1] + 60.0
                    who = "your address" if key.startswith("address:") else "you"
                    raise RateLimited(
                        f"The limit of {limit} {self.what} a minute for {who} is reached. "
                        f"Please wait {max(1.0, free_at - now):.0f} s and try again.")
                windows.append(hits)
            for hits in windows:
                hits.extend([now] * cost)

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 10.0:
            return
        self._last_prune = now
        for key in [k for k, hits in self._hits.items() if not hits or now - hits[-1] >= 60.0]:
            del self._hits[key]


class RequestLimits:
    """The service's two budgets, generated replies and feedback writes, each per identity and per address."""

    def __init__(self, config: LimitConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or LimitConfig()
        self._generations = RateLimiter("generated replies", clock=clock)
        self._feedback = RateLimiter("feedback actions", clock=clock)

    @staticmethod
    def _budgets(user_id: str, address: str | None, per_user: int, per_address: int) -> dict[str, int]:
        budgets = {f"user:{user_id}": per_user}
        if address is not None:
            budgets[f"address:{address}"] = per_address
        return budgets

    def generation(self, user_id: str, address: str | None, cost: int = 1) -> None:
        """Charge `cost` generated replies (a chat reply 1, a Compare battle 2, a Rank of K replies K)."""
        c = self.config
        self._generations.check(self._budgets(user_id, address, c.generations_per_user, c.generations_per_address),
                                cost)

    def feedback(self, user_id: str, address: str | None) -> None:
        """Charge one feedback write (a rating, vote, ranking or demonstration)."""
        c = self.config
        self._feedback.check(self._budgets(user_id, address, c.feedback_per_user, c.feedback_per_address))

    def tracked_keys(self) -> int:
        """How many identities and addresses the limiters remember (it must not grow forever)."""
        return len(self._generations) + len(self._feedback)
