"""Who is asking: identities the server issues and signs, never ones the browser makes up.

A logged-in user is their login name (Gradio's `request.username`, checked by the server).
Anyone else gets an anonymous id (`anon-<random>`) the first time they open the page; the
browser keeps it as a signed token in localStorage: `<id>.<HMAC-SHA256(key, id)>`. The key
lives server-side (a 0600 file beside the database, or $ALIGNLOOP_SECRET_KEY), so a token
survives restarts (the conversations come back after a reload) and nobody can write a valid
token for somebody else's id. A session that never loaded the page (a raw API client) gets a
fresh anonymous id for the session; how many a client address may mint is limited, because
each new id is a new voter for the promotion test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .limits import UserFacingError

SECRET_ENV = "ALIGNLOOP_SECRET_KEY"
ANON_PREFIX = "anon-"


def secret_key_path(db_path: Path) -> Path:
    """Where the signing key of the database at `db_path` is kept: `<db>.secret` beside it."""
    return Path(str(db_path) + ".secret")


def load_or_create_key(path: Path) -> bytes:
    """$ALIGNLOOP_SECRET_KEY if set, else the key in `path`, created (32 random bytes, mode 0600) if missing."""
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode("utf-8")
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:  # two servers starting at once: the first key written wins, both use it
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


class IdentitySigner:
    """Signs and checks anonymous identity tokens with a server-side key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError(f"the identity key must be at least 16 bytes; set {SECRET_ENV} to a longer secret.")
        self._key = key

    def key_for(self, purpose: str) -> bytes:
        """A key for another purpose, derived from this one (never the signing key itself)."""
        return hmac.new(self._key, f"alignloop:{purpose}".encode(), hashlib.sha256).digest()

    def _mac(self, user_id: str) -> str:
        digest = hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def token(self, user_id: str) -> str:
        """The token the browser keeps for `user_id`."""
        return f"{user_id}.{self._mac(user_id)}"

    def verify(self, token: object) -> str | None:
        """The anonymous id a token stands for, or None if it is missing, malformed or forged."""
        if not isinstance(token, str) or len(token) > 200:
            return None
        user_id, dot, mac = token.rpartition(".")
        if not dot or not user_id.startswith(ANON_PREFIX):
            return None
        return user_id if hmac.compare_digest(mac.encode("ascii", "replace"),
                                              self._mac(user_id).encode("ascii")) else None

    @staticmethod
    def new_anonymous_id() -> str:
        return f"{ANON_PREFIX}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the identity the server resolved, and the client's address (for limits)."""

    user_id: str
    address: str | None = None


@dataclass
class IdentityConfig:
    """Limits on minting anonymous identities."""

    anonymous_ids_per_hour: int = 60  # new anonymous ids one client address may get per hour (0: no limit)


class AnonymousIdQuota:
    """At most `per_hour` new anonymous identities per client address in any sliding hour."""

    def __init__(self, per_hour: int, *, clock=time.monotonic) -> None:
        self.per_hour = per_hour
        self._clock = clock
        self._minted: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, address: str) -> None:
        """Count one new identity for `address`, or refuse with what to do."""
        if self.per_hour <= 0:
            return
        now = self._clock()
        with self._lock:
            for key in [k for k, q in self._minted.items() if not q or now - q[-1] >= 3600.0]:
                del self._minted[key]  # the map holds only addresses seen in the last hour
            minted = self._minted.setdefault(address, deque())
            while minted and now - minted[0] >= 3600.0:
                minted.popleft()
            if len(minted) >= self.per_hour:
                wait = 3600.0 - (now - minted[0])
                raise UserFacingError(
                    f"Too many new sessions from your address ({self.per_hour} in the last hour). Reuse your "
                    f"browser session (cookies and local storage on), log in, or try again in {wait / 60:.0f} min.")
            minted.append(now)
