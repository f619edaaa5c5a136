"""Per-user request limits, and the error type whose message the UI shows as is."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque


class UserFacingError(Exception):
    """A refusal the user should read (rate limit, input too long, engine down...)."""


class RateLimiter:
    """At most `per_minute` requests per user in any sliding 60-second window."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, user_id: str) -> None:
        """Count one request, or raise UserFacingError saying when to retry."""
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            hits = self._hits[user_id]
            while hits and now - hits[0] >= 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                wait = 60.0 - (now - hits[0])
                raise UserFacingError(
                    f"You have sent {self.per_minute} requests in the last minute, the limit. "
                    f"Please wait {wait:.0f} s and try again."
                )
            hits.append(now)
