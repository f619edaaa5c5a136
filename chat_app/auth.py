"""Who may log in and who may run the dashboard: hashed users, throttled passwords, one admin check.

* **Users file.** Logins (`alignloop serve --users-file PATH`) come from a JSON file of scrypt
  hashes, each with its own salt, written 0600 by `alignloop users add|remove` (the CLI reads the
  password from a prompt or stdin, never from argv, where `ps` would show it). Default location:
  `$ALIGNLOOP_USERS_FILE`, else `users.json` beside the feedback database.
* **Throttle.** Every wrong password (the Gradio login form, the dashboard's admin password box)
  is counted per client address and per user name: a few are free (typos), then each one doubles
  the wait before the next try, and a run of them locks the key out for a while. A refused try
  logs one line, never a traceback, and tells the user how long to wait.
* **Admin check.** `admin_only(guard)` wraps every dashboard handler: the server decides from the
  request (the logged-in name, the client address) and the admin password typed in, and hands the
  handler the operator's name for the registry's audit log (`actor=`).

Passwords are compared as NFC-normalised UTF-8 bytes, so any Unicode password works.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr

from feedback_db import default_db_path

from .limits import UserFacingError

log = logging.getLogger(__name__)

USERS_FILE_ENV = "ALIGNLOOP_USERS_FILE"
ADMIN_PASSWORD_ENV = "ALIGNLOOP_ADMIN_PASSWORD"
USERS_FILE_FORMAT = "alignloop-users/1"
MIN_PASSWORD_CHARS = 8
MAX_NAME_CHARS = 64
NO_ADMIN_CONFIGURED = (f"No admin is configured on this server. Set {ADMIN_PASSWORD_ENV} in the server's environment, "
                       "or add an admin with `alignloop users add NAME --admin` and start the server with "
                       "`--users-file`.")


class AuthError(UserFacingError):
    """A refused login or admin action; the message says what to do (and how long to wait)."""


class UsersFileError(Exception):
    """The users file cannot be read, or a change to it is refused; the message says why."""


# -- passwords -----------------------------------------------------------------------------------


def password_bytes(password: str) -> bytes:
    """The bytes a password stands for: NFC-normalised UTF-8 (an "é" typed either way is the same password)."""
    return unicodedata.normalize("NFC", password).encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost: n=2^15, r=8 takes 32 MiB and about 0.1-0.2 s per hash on one core."""

    n: int = 2**15
    r: int = 8
    p: int = 1

    def derive(self, password: str, salt: bytes) -> bytes:
        return hashlib.scrypt(password_bytes(password), salt=salt, n=self.n, r=self.r, p=self.p,
                              maxmem=256 * self.n * self.r * self.p, dklen=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, params: ScryptParams = ScryptParams()) -> str:
    """`scrypt$n$r$p$<salt>$<hash>` with a fresh 16-byte salt (base64); what the users file stores."""
    salt = os.urandom(16)
    return f"scrypt${params.n}${params.r}${params.p}${_b64(salt)}${_b64(params.derive(password, salt))}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches a `hash_password` string (a constant-time compare of the derived bytes)."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        params = ScryptParams(int(n), int(r), int(p))
        expected = base64.b64decode(digest, validate=True)
        actual = params.derive(password, base64.b64decode(salt, validate=True))
    except ValueError:  # a damaged entry never matches (binascii.Error is a ValueError)
        return False
    return hmac.compare_digest(actual, expected)


def same_secret(given: str, expected: str) -> bool:
    """A constant-time compare of two plain secrets (the shared admin password), on SHA-256 digests of
    their bytes so that neither a non-ASCII character nor a different length gives anything away."""
    return hmac.compare_digest(hashlib.sha256(password_bytes(given)).digest(),
                               hashlib.sha256(password_bytes(expected)).digest())


# -- the users file ------------------------------------------------------------------------------


def default_users_path() -> Path:
    """`$ALIGNLOOP_USERS_FILE`, else `users.json` beside the feedback database (`feedback_db.default_db_path`)."""
    env = os.environ.get(USERS_FILE_ENV)
    return Path(env).expanduser() if env else default_db_path().with_name("users.json")


def check_user_name(name: str) -> str:
    """`name` if it can be a login name (1-64 printable characters, no spaces), else UsersFileError."""
    if not name or len(name) > MAX_NAME_CHARS or any(c.isspace() or not c.isprintable() for c in name):
        raise UsersFileError(f"A user name has 1 to {MAX_NAME_CHARS} printable characters and no spaces; "
                             f"{name!r} does not.")
    return name


@dataclass(frozen=True)
class ApiKeyRecord:
    """One API key of a user: its public id (to revoke it by), the SHA-256 of the key, when it was made.

    Keys are 256-bit random strings, so a plain SHA-256 is enough to keep a stolen users file from
    giving them away (a password needs scrypt because people choose guessable ones).
    """

    key_id: str
    sha256: str
    created_at: str = ""


API_KEY_PREFIX = "alk"


def new_api_key() -> tuple[str, ApiKeyRecord]:
    """A fresh key `alk-<id>-<secret>` and the record that stands for it in the users file."""
    key_id = secrets.token_hex(4)
    key = f"{API_KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
    return key, ApiKeyRecord(key_id, api_key_digest(key), _utc_now())


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class UserRecord:
    """One login: its password hash, whether it may use the dashboard, when it was added, its API keys."""

    name: str
    password_hash: str
    admin: bool = False
    created_at: str = ""
    api_keys: tuple[ApiKeyRecord, ...] = ()


@dataclass
class UsersFile:
    """The users file at `path`: read, add, remove. Every write replaces the whole file atomically, mode 0600."""

    path: Path
    params: ScryptParams = field(default_factory=ScryptParams)

    def read(self) -> dict[str, UserRecord]:
        """The users by name; {} when the file does not exist yet."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UsersFileError(f"Cannot read the users file {self.path} ({exc}). Fix or remove it, then add "
                                 "users with `alignloop users add NAME`.") from None
        if not isinstance(data, dict) or data.get("format") != USERS_FILE_FORMAT or not isinstance(data.get("users"), dict):
            raise UsersFileError(f"{self.path} is not an alignloop users file (format {USERS_FILE_FORMAT!r} expected). "
                                 "Write it with `alignloop users add NAME`.")
        try:
            return {name: UserRecord(name, str(u["password"]), bool(u.get("admin", False)), str(u.get("created_at", "")),
                                     tuple(ApiKeyRecord(str(k["id"]), str(k["sha256"]), str(k.get("created_at", "")))
                                           for k in u.get("api_keys", [])))
                    for name, u in data["users"].items()}
        except (KeyError, TypeError):
            raise UsersFileError(f"{self.path} has a user without a password hash; remove it with "
                                 "`alignloop users remove NAME` and add it again.") from None

    def add(self, name: str, password: str, *, admin: bool = False, replace: bool = False) -> UserRecord:
        """Add a user (or, with `replace`, set an existing user's password and admin flag)."""
        check_user_name(name)
        if len(unicodedata.normalize("NFC", password)) < MIN_PASSWORD_CHARS:
            raise UsersFileError(f"A password needs at least {MIN_PASSWORD_CHARS} characters.")
        users = self.read()
        if name in users and not replace:
            raise UsersFileError(f"User {name!r} already exists in {self.path}; pass --update to change their "
                                 "password or admin flag.")
        old = users.get(name)
        users[name] = UserRecord(name, hash_password(password, self.params), admin,
                                 old.created_at if old else _utc_now(), old.api_keys if old else ())
        self._write(users)
        return users[name]

    def add_api_key(self, name: str) -> tuple[str, ApiKeyRecord]:
        """A new API key for user `name`: the key itself (shown once, never stored) and its record."""
        users = self.read()
        if name not in users:
            raise UsersFileError(f"No user {name!r} in {self.path}; add them first with `alignloop users add {name}`.")
        key, record = new_api_key()
        users[name] = dataclasses.replace(users[name], api_keys=users[name].api_keys + (record,))
        self._write(users)
        return key, record

    def revoke_api_key(self, name: str, key_id: str) -> None:
        users = self.read()
        if name not in users or not any(k.key_id == key_id for k in users[name].api_keys):
            raise UsersFileError(f"User {name!r} has no API key {key_id!r} (see `alignloop users list`).")
        users[name] = dataclasses.replace(users[name], api_keys=tuple(k for k in users[name].api_keys if k.key_id != key_id))
        self._write(users)

    def remove(self, name: str) -> None:
        users = self.read()
        if name not in users:
            raise UsersFileError(f"No user {name!r} in {self.path} (see `alignloop users list`).")
        del users[name]
        self._write(users)

    def _write(self, users: dict[str, UserRecord]) -> None:
        data = {"format": USERS_FILE_FORMAT,
                "users": {u.name: {"password": u.password_hash, "admin": u.admin, "created_at": u.created_at,
                                   "api_keys": [{"id": k.key_id, "sha256": k.sha256, "created_at": k.created_at}
                                                for k in u.api_keys]}
                          for u in sorted(users.values(), key=lambda u: u.name)}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask; the file holds password hashes
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


class UserDirectory:
    """The logins a server accepts, read once from a users file at start-up (restart to apply changes).

    `authenticate` is the callable to give Gradio as `auth=`: it checks the hash off the event loop.
    """

    def __init__(self, users: dict[str, UserRecord], params: ScryptParams = ScryptParams()) -> None:
        self._users = dict(users)
        # A name that does not exist costs the same hash as one that does: timing tells nothing.
        self._decoy = hash_password("decoy password", params)

    @classmethod
    def load(cls, path: Path) -> UserDirectory:
        if not path.is_file():
            raise UsersFileError(f"There is no users file at {path}; create it with "
                                 f"`alignloop users add NAME --file {path}` (`--admin` for the dashboard).")
        users = UsersFile(path).read()
        if not users:
            raise UsersFileError(f"The users file {path} has no users; add one with `alignloop users add NAME` "
                                 "(`--admin` for the dashboard).")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("the users file %s is readable by others (mode %o); run `chmod 600 %s`", path, mode, path)
        return cls(users)

    def __len__(self) -> int:
        return len(self._users)

    def admin_names(self) -> set[str]:
        """The users flagged `--admin`: they may use the dashboard without the admin password."""
        return {u.name for u in self._users.values() if u.admin}

    def verify(self, name: str, password: str) -> bool:
        user = self._users.get(name)
        ok = verify_password(password, user.password_hash if user else self._decoy)
        return ok and user is not None

    async def authenticate(self, username: str, password: str) -> bool:
        """Gradio's `auth` callable (async, so the scrypt runs in a worker thread)."""
        return await asyncio.to_thread(self.verify, username, password)


class ApiKeyDirectory:
    """Which user an API key belongs to, from the users file, re-read whenever the file changes (a key
    made or revoked with `alignloop users key` works at once, without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def owner(self, key: str) -> str | None:
        """The user name `key` belongs to, or None (unknown, revoked, or no users file)."""
        with self._lock:
            try:
                stat = self.path.stat()
            except OSError:
                self._stamp, self._owners = None, {}
                return None
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                try:
                    users = UsersFile(self.path).read()
                except UsersFileError as exc:
                    log.error("API keys unavailable: %s", exc)
                    users = {}
                self._owners = {k.sha256: u.name for u in users.values() for k in u.api_keys}
                self._stamp = (stat.st_mtime_ns, stat.st_size)
            return self._owners.get(api_key_digest(key))


# -- throttling wrong passwords ------------------------------------------------------------------


@dataclass
class ThrottleConfig:
    """How wrong passwords slow down further tries, per key (a client address, a user name)."""

    free_failures: int = 3  # wrong passwords in a row with no wait (typos)
    base_delay_s: float = 1.0  # the wait after the next one; it doubles with each further failure
    max_delay_s: float = 60.0
    lockout_after: int = 10  # failures in a row that lock the key out
    lockout_s: float = 900.0
    forget_after_s: float = 3600.0  # a key with no failure for this long starts afresh

    def wait_after(self, failures: int) -> float:
        """Seconds before the next try after `failures` wrong passwords in a row."""
        if failures >= self.lockout_after:
            return self.lockout_s
        if failures <= self.free_failures:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** (failures - self.free_failures - 1))


@dataclass
class _Strikes:
    failures: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0


def wait_text(seconds: float) -> str:
    return f"Try again in {max(1, math.ceil(seconds))} s."


class PasswordThrottle:
    """Exponential back-off and lockout after wrong passwords, for every key of a try at once.

    A try is refused while any of its keys waits (`retry_after`); `failed` counts a wrong password
    against every key and returns the wait; `succeeded` clears them. Keys with no recent failure
    are dropped, so the map holds only the last hour's offenders. Thread-safe; `clock` is injectable.
    """

    def __init__(self, config: ThrottleConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.config = config or ThrottleConfig()
        self._clock = clock
        self._max_keys = max_keys
        self._strikes: dict[str, _Strikes] = {}
        self._lock = threading.Lock()
        self._last_prune = clock()

    def __len__(self) -> int:
        return len(self._strikes)

    def retry_after(self, keys: Iterable[str]) -> float:
        """Seconds until a try with these keys is allowed (0: now)."""
        now = self._clock()
        with self._lock:
            return max([0.0] + [s.blocked_until - now for k in keys if (s := self._live(k, now))])

    def failed(self, keys: Iterable[str]) -> tuple[int, float]:
        """Count a wrong password against each key: (failures in a row, seconds before the next try)."""
        now = self._clock()
        most, wait = 0, 0.0
        with self._lock:
            for key in keys:
                strikes = self._live(key, now) or self._strikes.setdefault(key, _Strikes())
                strikes.failures += 1
                strikes.last_failure = now
                strikes.blocked_until = now + self.config.wait_after(strikes.failures)
                most, wait = max(most, strikes.failures), max(wait, strikes.blocked_until - now)
            self._prune(now)
        return most, wait

    def succeeded(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._strikes.pop(key, None)

    def _live(self, key: str, now: float) -> _Strikes | None:
        strikes = self._strikes.get(key)
        if strikes is not None and now - strikes.last_failure > self.config.forget_after_s and now >= strikes.blocked_until:
            del self._strikes[key]
            return None
        return strikes

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 60 and len(self._strikes) <= self._max_keys:
            return
        self._last_prune = now
        for key in list(self._strikes):
            self._live(key, now)
        if len(self._strikes) > self._max_keys:  # a flood of new names: keep the most recent offenders
            for key, _ in sorted(self._strikes.items(), key=lambda kv: kv[1].last_failure)[:len(self._strikes) - self._max_keys]:
                del self._strikes[key]


def throttle_keys(address: str | None, user: str | None) -> list[str]:
    """The keys a try is counted under: its client address and, when given, its user name."""
    keys = [f"address:{address or 'unknown'}"]
    if user:
        keys.append(f"user:{user}")
    return keys


def _shown(name: str | None) -> str:
    """A client-sent name as it may appear in a log line (quoted and escaped, at most 64 characters)."""
    return repr(name[:MAX_NAME_CHARS]) if name else "-"


# -- the dashboard's admin check -----------------------------------------------------------------


def request_address(request: gr.Request | None) -> str:
    """The client address of a Gradio request (a reverse proxy's own address when behind one)."""
    client = getattr(request, "client", None) if request is not None else None
    return str(getattr(client, "host", None) or "unknown")


class AdminGuard:
    """Decides on the server whether a request may act as admin, and as whom.

    A logged-in user in `admin_users` is the admin as themselves. Otherwise the shared admin password
    ($ALIGNLOOP_ADMIN_PASSWORD) must be given; the operator is then recorded as
    `admin-password@<client address>` (prefixed by the login name, if any). Wrong passwords are
    throttled per client address and per login name.
    """

    def __init__(self, password: str | None, admin_users: Collection[str] = (), *,
                 throttle: PasswordThrottle | None = None) -> None:
        self._password = password or None
        self._admin_users = admin_users  # kept by reference: the caller's set may grow after start-up
        self.throttle = throttle if throttle is not None else PasswordThrottle()

    @property
    def configured(self) -> bool:
        return bool(self._password or self._admin_users)

    def authorize(self, request: gr.Request | None, password: str | None) -> str:
        """The operator's name for the audit log, or AuthError saying what to do."""
        username = getattr(request, "username", None) if request is not None else None
        if username and username in self._admin_users:
            return str(username)
        if not self.configured:
            raise AuthError(NO_ADMIN_CONFIGURED)
        if not self._password:
            raise AuthError(f"The dashboard is for admins: log in as a user added with `--admin`"
                            f"{' (you are not one)' if username else ''}.")
        address = request_address(request)
        keys = throttle_keys(address, username)
        wait = self.throttle.retry_after(keys)
        if wait > 0:
            raise AuthError(f"Too many wrong admin passwords. {wait_text(wait)}")
        if not password:
            raise AuthError("The dashboard needs the admin password.")
        if not same_secret(password, self._password):
            failures, wait = self.throttle.failed(keys)
            log.warning("wrong admin password from %s (login %s): %d in a row, next try in %.0f s",
                        address, _shown(username), failures, wait)
            raise AuthError(f"Wrong admin password. {wait_text(wait)}" if wait > 0 else "Wrong admin password.")
        self.throttle.succeeded(keys)
        return f"{username}+admin-password@{address}" if username else f"admin-password@{address}"


def admin_only(guard: AdminGuard) -> Callable[[Callable], Callable]:
    """Decorator for a dashboard handler: only the admin gets through.

    The handler is written as ``fn(actor, *inputs)`` (`actor`: the operator's name, for the audit log);
    Gradio sees ``fn(admin_password, *inputs, request)``: the first input must be the admin password
    box. A refusal becomes a toast (no traceback in the log; `AdminGuard` logs one line).
    """
    def wrap(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())[1:]
        signature = inspect.Signature([inspect.Parameter("admin_password", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
                                      + params
                                      + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                           annotation=gr.Request)])

        def actor_for(password: Any, request: gr.Request | None) -> str:
            try:
                return guard.authorize(request, password if isinstance(password, str) else None)
            except AuthError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        if inspect.iscoroutinefunction(fn):
            async def wrapper(password: Any, *args: Any) -> Any:
                *inputs, request = args
                return await fn(actor_for(password, request), *inputs)
        else:
            def wrapper(password: Any, *args: Any) -> Any:
                *inputs, request = args
                return fn(actor_for(password, request), *inputs)

        functools.update_wrapper(wrapper, fn)
        del wrapper.__wrapped__  # Gradio must see the new signature, not fn's
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        # Gradio finds the gr.Request parameter by type hint (typing.get_type_hints), not by the signature.
        wrapper.__annotations__ = {"request": gr.Request}
        return wrapper
    return wrap


# -- throttling Gradio's login form --------------------------------------------------------------


LOGIN_MESSAGE = "Several wrong passwords in a row make you wait before the next try (up to 15 minutes)."
_MAX_LOGIN_BODY = 64 * 1024


class LoginThrottleMiddleware:
    """ASGI middleware in front of Gradio's `POST /login`: back-off and lockout per client address and
    per user name, one log line per wrong password, and a response that says how long to wait.

    Gradio's `auth` callable only sees (username, password), never the client, hence a middleware.
    The browser's login form shows "Incorrect credentials" for any 400, so refusals are 400s; the
    body (`{"detail": "... Try again in N s."}`) and `Retry-After` are there for API clients.
    """

    def __init__(self, app: Any, throttle: PasswordThrottle, path: str = "/login") -> None:
        self.app = app
        self.throttle = throttle
        self.path = path.rstrip("/")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, _MAX_LOGIN_BODY)
        if body is None:
            await _send_json(send, 413, {"detail": "The login request is too large."})
            return
        username = await _form_username(scope, body)
        address = (scope.get("client") or ("unknown",))[0]
        keys = throttle_keys(address, username)
        wait = self.throttle.retry_after(keys)
        if wait > 0:
            await _send_json(send, 400, {"detail": f"Too many wrong passwords. {wait_text(wait)}"}, retry_after=wait)
            return
        replaced = False

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def watch(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start":
                if message["status"] == 400:  # Gradio's "Incorrect credentials."
                    replaced = True
                    failures, wait = self.throttle.failed(keys)
                    log.warning("wrong password at login for user %s from %s: %d in a row, next try in %.0f s",
                                _shown(username), address, failures, wait)
                    detail = "Wrong user name or password." + (f" {wait_text(wait)}" if wait > 0 else "")
                    await _send_json(send, 400, {"detail": detail}, retry_after=wait)
                    return
                if message["status"] == 200:
                    self.throttle.succeeded(keys)
            if not replaced:
                await send(message)

        await self.app(scope, replay, watch)


def install_login_guard(app: Any, throttle: PasswordThrottle | None = None, *, path: str = "/login") -> PasswordThrottle:
    """Throttle wrong passwords at Gradio's login route of `app` (the FastAPI app Gradio is mounted on,
    before it starts); `path` is the mount path + "/login". Returns the throttle."""
    throttle = throttle if throttle is not None else PasswordThrottle()
    app.add_middleware(LoginThrottleMiddleware, throttle=throttle, path=path)
    return throttle


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _form_username(scope: dict, body: bytes) -> str | None:
    """The `username` field of a login form (urlencoded or multipart), stripped as Gradio strips it."""
    from starlette.requests import Request

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(scope, receive).form() as form:
            name = form.get("username")
    except Exception:  # noqa: BLE001 - a malformed form: Gradio refuses it; count the address only
        return None
    return name.strip() if isinstance(name, str) else None


async def _send_json(send: Callable, status: int, content: dict, *, retry_after: float = 0.0) -> None:
    body = json.dumps(content).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after > 0:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
