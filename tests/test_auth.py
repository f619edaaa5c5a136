"""chat_app.auth: hashed users, the wrong-password throttle, the admin check, and Gradio's login route behind it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import unicodedata
from pathlib import Path

import gradio as gr
import pytest
from fastapi import FastAPI
from gradio.helpers import special_args
from starlette.requests import Request
from starlette.testclient import TestClient

from chat_app.auth import (
    AdminGuard,
    ApiKeyDirectory,
    PasswordThrottle,
    ScryptParams,
    ThrottleConfig,
    UserDirectory,
    UsersFile,
    UsersFileError,
    admin_only,
    hash_password,
    install_login_guard,
    verify_password,
)

CHEAP = ScryptParams(n=2**10)  # the format and the checks are the same; only the cost is lower
UNICODE_PASSWORD = "pässwörd-密码-🔑"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gradio_request(address: str = "203.0.113.7", username: str | None = None) -> gr.Request:
    """A gr.Request as Gradio builds it for a handler: the client's address and the logged-in name."""
    scope = {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "headers": [],
             "query_string": b"", "client": (address, 40000)}
    return gr.Request(Request(scope), username=username)


# -- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["correct horse battery", UNICODE_PASSWORD])
def test_hash_round_trip(password: str) -> None:
    encoded = hash_password(password, CHEAP)
    assert encoded.startswith("scrypt$1024$8$1$") and password not in encoded
    assert verify_password(password, encoded)
    assert not verify_password(password + "x", encoded)
    assert not verify_password("", encoded)
    assert hash_password(password, CHEAP) != encoded  # a fresh salt each time


def test_a_password_typed_composed_or_decomposed_is_the_same_password() -> None:
    encoded = hash_password(unicodedata.normalize("NFC", "café-crème"), CHEAP)
    assert verify_password(unicodedata.normalize("NFD", "café-crème"), encoded)


def test_a_damaged_hash_never_matches() -> None:
    encoded = hash_password("some password", CHEAP)
    for damaged in ["", "plain", encoded.replace("scrypt", "md5"), encoded[:-8] + "!!!!!!!!", encoded + "$x"]:
        assert not verify_password("some password", damaged)


# -- the users file ------------------------------------------------------------------------------


def test_users_file_is_written_0600_without_plaintext(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        users = UsersFile(tmp_path / "sub" / "users.json", CHEAP)
        users.add("alice", UNICODE_PASSWORD, admin=True)
        users.add("bob", "bob's password")
    finally:
        os.umask(old)
    assert stat.S_IMODE(users.path.stat().st_mode) == 0o600
    text = users.path.read_text(encoding="utf-8")
    assert UNICODE_PASSWORD not in text and "bob's password" not in text
    records = users.read()
    assert sorted(records) == ["alice", "bob"] and records["alice"].admin and not records["bob"].admin
    directory = UserDirectory(records, CHEAP)
    assert directory.verify("alice", UNICODE_PASSWORD) and directory.verify("bob", "bob's password")
    assert not directory.verify("alice", "bob's password") and not directory.verify("carol", "bob's password")
    assert directory.admin_names() == {"alice"}
    assert asyncio.run(directory.authenticate("bob", "bob's password"))
    assert [p.name for p in users.path.parent.iterdir()] == ["users.json"]  # no temporary file left


def test_users_file_refuses_duplicates_bad_names_short_passwords_and_damage(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json", CHEAP)
    users.add("alice", "first password")
    with pytest.raises(UsersFileError, match="--update"):
        users.add("alice", "second password")
    users.add("alice", "second password", admin=True, replace=True)
    assert UserDirectory(users.read(), CHEAP).verify("alice", "second password")
    for name in ["", "a b", "x" * 65, "tab\tname"]:
        with pytest.raises(UsersFileError, match="printable"):
            users.add(name, "long enough password")
    with pytest.raises(UsersFileError, match="at least 8"):
        users.add("bob", "short")
    with pytest.raises(UsersFileError, match="No user 'carol'"):
        users.remove("carol")
    users.remove("alice")
    assert users.read() == {}
    users.path.write_text('{"users": "not a map"}')
    with pytest.raises(UsersFileError, match="not an alignloop users file"):
        users.read()
    with pytest.raises(UsersFileError, match="no users file"):
        UserDirectory.load(tmp_path / "missing.json")


# -- the throttle --------------------------------------------------------------------------------


def test_throttle_backs_off_exponentially_then_locks_out() -> None:
    clock = FakeClock()
    config = ThrottleConfig(free_failures=3, base_delay_s=1, max_delay_s=60, lockout_after=10, lockout_s=900)
    throttle = PasswordThrottle(config, clock=clock)
    keys = ["address:1.2.3.4"]
    waits = []
    for _ in range(10):
        assert throttle.retry_after(keys) == 0
        failures, wait = throttle.failed(keys)
        waits.append(wait)
        clock.now += wait
    assert waits == [0, 0, 0, 1, 2, 4, 8, 16, 32, 900]
    assert throttle.retry_after(keys) == 0
    assert throttle.failed(keys) == (11, 900)  # still locked out after the next one
    clock.now += 300
    assert throttle.retry_after(keys) == 600
    assert throttle.retry_after(["address:5.6.7.8"]) == 0  # another address is not affected
    assert throttle.retry_after(["address:5.6.7.8", "user:alice"]) == 0
    assert throttle.retry_after(["address:5.6.7.8", *keys]) == 600  # any waiting key holds the try


def test_success_clears_and_old_failures_are_forgotten() -> None:
    clock = FakeClock()
    throttle = PasswordThrottle(ThrottleConfig(free_failures=1, forget_after_s=3600), clock=clock)
    throttle.failed(["address:a", "user:alice"])
    assert throttle.failed(["address:a", "user:alice"]) == (2, 1.0)
    throttle.succeeded(["address:a", "user:alice"])
    assert len(throttle) == 0 and throttle.failed(["address:a"]) == (1, 0.0)
    for i in range(50):
        throttle.failed([f"address:spray-{i}"])
    assert len(throttle) == 51
    clock.now += 3601
    throttle.failed(["address:late"])  # pruning happens on the way
    assert len(throttle) == 1


# -- the admin check -----------------------------------------------------------------------------


def test_wrong_admin_passwords_are_throttled_with_one_log_line_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    guard = AdminGuard("the admin password", throttle=PasswordThrottle(clock=clock))
    request = gradio_request("198.51.100.9")
    caplog.set_level(logging.INFO)
    messages = []
    for _ in range(5):
        clock.now += guard.throttle.retry_after(["address:198.51.100.9"])  # wait as told
        with pytest.raises(Exception) as err:
            guard.authorize(request, "guess")
        messages.append(str(err.value))
    assert messages[:3] == ["Wrong admin password."] * 3
    assert messages[3:] == ["Wrong admin password. Try again in 1 s.", "Wrong admin password. Try again in 2 s."]
    assert not any("no admin" in m.lower() for m in messages)
    records = [r for r in caplog.records if r.name == "chat_app.auth"]
    assert len(records) == 5 and all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert "198.51.100.9" in records[-1].getMessage()
    with pytest.raises(Exception, match="Too many wrong admin passwords. Try again in 2 s."):
        guard.authorize(request, "the admin password")  # even the right one waits
    assert len([r for r in caplog.records if r.name == "chat_app.auth"]) == 5
    assert guard.authorize(gradio_request("192.0.2.1"), "the admin password") == "admin-password@192.0.2.1"
    clock.now += 2
    assert guard.authorize(request, "the admin password") == "admin-password@198.51.100.9"
    with pytest.raises(Exception, match=r"^Wrong admin password\.$"):
        guard.authorize(request, "guess")  # the right one cleared the count


def test_a_non_ascii_admin_password_works() -> None:
    guard = AdminGuard(UNICODE_PASSWORD)
    assert guard.authorize(gradio_request(), unicodedata.normalize("NFD", UNICODE_PASSWORD)).startswith("admin-password@")
    with pytest.raises(Exception, match="Wrong admin password"):
        guard.authorize(gradio_request(), "pässwörd")


def test_logged_in_admins_are_themselves_and_others_are_refused() -> None:
    guard = AdminGuard("shared secret", {"alice"})
    assert guard.authorize(gradio_request(username="alice"), None) == "alice"
    with pytest.raises(Exception, match="needs the admin password"):
        guard.authorize(gradio_request(username="bob"), None)
    assert guard.authorize(gradio_request("192.0.2.5", username="bob"), "shared secret") == "bob+admin-password@192.0.2.5"
    logins_only = AdminGuard(None, {"alice"})
    with pytest.raises(Exception, match="log in as a user added with `--admin` \\(you are not one\\)"):
        logins_only.authorize(gradio_request(username="bob"), "anything")


def test_with_no_admin_configured_the_message_says_how_to_configure_one() -> None:
    with pytest.raises(Exception) as err:
        AdminGuard(None).authorize(gradio_request(), "anything")
    assert "ALIGNLOOP_ADMIN_PASSWORD" in str(err.value) and "alignloop users add NAME --admin" in str(err.value)
    assert "Wrong" not in str(err.value)


def test_admin_only_checks_on_the_server_and_passes_the_operator() -> None:
    guard = AdminGuard("secret", {"alice"})
    calls = []

    @admin_only(guard)
    def report(actor: str, round_id: int) -> str:
        calls.append((actor, round_id))
        return f"report {round_id}"

    @admin_only(guard)
    async def promote(actor: str, name: str) -> str:
        calls.append((actor, name))
        return f"{name} by {actor}"

    # Gradio inserts the gr.Request where the signature asks for it (found by type hint).
    inputs, *_ = special_args(report, ["secret", 3], gradio_request("192.0.2.8"))
    assert report(*inputs) == "report 3" and calls == [("admin-password@192.0.2.8", 3)]
    assert asyncio.run(promote(None, "policy-r2", gradio_request(username="alice"))) == "policy-r2 by alice"
    for password, request in [("wrong", gradio_request()), (None, gradio_request(username="mallory")),
                              (None, None), ({"forged": "admin"}, gradio_request(username="admin"))]:
        with pytest.raises(gr.Error) as err:
            asyncio.run(promote(password, "policy-r3", request))
        assert err.value.print_exception is False
    assert len(calls) == 2


class _Service:
    """The service side of promote / rollback, recording the actor the dashboard passes."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, str | None, str]] = []

    async def promote(self, version: str, *, actor: str) -> str:
        self.actions.append(("promote", version, actor))
        return version

    async def rollback(self, *, actor: str) -> str:
        self.actions.append(("rollback", None, actor))
        return "base:tiny"


class _Runtime:
    def __init__(self, password: str | None, admin_users: set[str]) -> None:
        self.admin_password, self.admin_users, self.service = password, admin_users, _Service()

    def require(self) -> _Service:
        return self.service


def test_the_dashboard_records_who_promoted_and_rolled_back() -> None:
    from chat_app.ui.dashboard_tab import build_dashboard_tab

    rt = _Runtime("dashboard secret", {"alice"})
    with gr.Blocks() as demo:
        build_dashboard_tab(rt)  # type: ignore[arg-type]
    fns = {fn.api_name: fn.fn for fn in demo.fns.values()}
    assert asyncio.run(fns["promote"]("", "policy-r1", gradio_request(username="alice"))).startswith("✅")
    asyncio.run(fns["rollback"]("dashboard secret", gradio_request("192.0.2.44")))
    with pytest.raises(gr.Error, match="Wrong admin password"):
        asyncio.run(fns["promote"]("admin", "policy-r2", gradio_request(username="bob")))
    with pytest.raises(gr.Error, match="admin password"):
        fns["dashboard"]("", gradio_request())
    assert rt.service.actions == [("promote", "policy-r1", "alice"), ("rollback", None, "admin-password@192.0.2.44")]


# -- Gradio's login form behind the throttle -----------------------------------------------------


@pytest.fixture
def login_app(tmp_path: Path):
    users = UsersFile(tmp_path / "users.json", CHEAP)
    users.add("alice", UNICODE_PASSWORD)
    with gr.Blocks() as demo:
        gr.Markdown("hello")
    app = gr.mount_gradio_app(FastAPI(), demo, path="", auth=UserDirectory(users.read(), CHEAP).authenticate)
    clock = FakeClock()
    throttle = install_login_guard(app, PasswordThrottle(clock=clock))
    return app, clock, throttle


def test_gradio_login_is_throttled_per_address_and_per_user(login_app, caplog: pytest.LogCaptureFixture) -> None:
    app, clock, throttle = login_app
    caplog.set_level(logging.INFO)
    attacker = TestClient(app, client=("203.0.113.66", 5555))
    with attacker:
        details = []
        for _ in range(5):
            clock.now += throttle.retry_after(["address:203.0.113.66"])  # wait as told
            r = attacker.post("/login", data={"username": "alice", "password": "guess"})
            assert r.status_code == 400
            details.append(r.json()["detail"])
        assert details[:3] == ["Wrong user name or password."] * 3
        assert details[3:] == ["Wrong user name or password. Try again in 1 s.",
                               "Wrong user name or password. Try again in 2 s."]
        assert r.headers["retry-after"] == "2"
        # Blocked: refused without checking the password (the right one too), and not logged again.
        r = attacker.post("/login", data={"username": "alice", "password": UNICODE_PASSWORD})
        assert r.status_code == 400 and r.json()["detail"] == "Too many wrong passwords. Try again in 2 s."
        # The user name is held too, from any address; another user from another address is not.
        elsewhere = TestClient(app, client=("192.0.2.10", 6666))
        r = elsewhere.post("/login", data={"username": "alice", "password": UNICODE_PASSWORD})
        assert r.json()["detail"] == "Too many wrong passwords. Try again in 2 s."
        r = elsewhere.post("/login", data={"username": "bob", "password": "whatever"})
        assert r.json()["detail"] == "Wrong user name or password."
        clock.now += 2
        # The browser's form posts multipart; a non-ASCII password logs in and clears the count.
        r = attacker.post("/login", data={"username": " alice ", "password": UNICODE_PASSWORD}, files={"x": ("", b"")})
        assert r.status_code == 200 and r.json() == {"success": True}
        assert throttle.retry_after(["address:203.0.113.66", "user:alice"]) == 0
    records = [r for r in caplog.records if r.name == "chat_app.auth"]
    assert len(records) == 6 and all(r.exc_info is None for r in records)  # 5 + bob's, one line each
    assert "'alice'" in records[0].getMessage() and "203.0.113.66" in records[0].getMessage()


def test_login_guard_leaves_other_routes_alone_and_refuses_huge_forms(login_app) -> None:
    app, _, throttle = login_app
    with TestClient(app) as client:
        assert client.get("/gradio_api/login_check").status_code == 401
        r = client.post("/login", content=b"username=" + b"a" * 70_000,
                        headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413
        assert len(throttle) == 0


def test_users_file_json_is_readable_by_stock_tools(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json", CHEAP)
    users.add("zoë", UNICODE_PASSWORD, admin=True)
    data = json.loads(users.path.read_text(encoding="utf-8"))
    assert data["format"] == "alignloop-users/1"
    assert set(data["users"]["zoë"]) == {"password", "admin", "created_at", "api_keys"}


def test_api_keys_are_stored_as_digests_and_known_to_a_running_server_at_once(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json", CHEAP)
    users.add("ann", "ann's password")
    keys = ApiKeyDirectory(users.path)
    key, record = users.add_api_key("ann")
    assert key.startswith(f"alk-{record.key_id}-") and key not in users.path.read_text()
    assert keys.owner(key) == "ann" and keys.owner(key + "x") is None
    users.add("ann", "a new password", replace=True)  # a password change keeps the keys
    assert keys.owner(key) == "ann"
    users.revoke_api_key("ann", record.key_id)
    assert keys.owner(key) is None
    with pytest.raises(UsersFileError, match="no API key"):
        users.revoke_api_key("ann", record.key_id)
    with pytest.raises(UsersFileError, match="No user 'nobody'"):
        users.add_api_key("nobody")
    assert ApiKeyDirectory(tmp_path / "missing.json").owner(key) is None
