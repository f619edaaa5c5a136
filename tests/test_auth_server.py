"""`alignloop serve --users-file` on the tiny model, attacked over raw HTTP: wrong passwords at Gradio's /login
and in the dashboard's admin password box are throttled and logged once each (no traceback), and promote /
rollback record the operator."""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from chat_app.auth import UsersFile
from scripts.server_process import start_server, stop_server
from feedback_db import FeedbackStore, ModelRegistry
from tests.engine_contract import make_lora_adapter

PASSWORDS = {"alice": "alice's päss-wörd", "bob": "bob's password", "carol": "carol's password"}
SHARED = "shared sêcret"


@pytest.fixture(scope="module")
def login_server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("login-app")
    users = UsersFile(workdir / "users.json")
    for name, password in PASSWORDS.items():
        users.add(name, password, admin=name == "alice")
    server = start_server(tiny_model_path, workdir, engine="hf",
                          serve_args=["--max-new-tokens", "8", "--rate-limit", "0", "--users-file", str(users.path)],
                          env={"ALIGNLOOP_CACHE": str(workdir / "cache"), "ALIGNLOOP_ADMIN_PASSWORD": SHARED})
    yield server
    stop_server(server)


def post_login(url: str, username: str, password: str) -> tuple[int, str, str | None]:
    data = urllib.parse.urlencode({"username": username, "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "login", data=data), timeout=30) as r:
            return r.status, r.read().decode(), r.headers.get("retry-after")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers.get("retry-after")


def test_wrong_logins_are_throttled_and_logged_once_each(login_server) -> None:
    answers = [post_login(login_server.url, "bob", f"guess {i}") for i in range(5)]
    assert [a[0] for a in answers] == [400] * 5
    assert all("Wrong user name or password." in a[1] for a in answers[:4])
    assert "Try again in 1 s." in answers[3][1] and answers[3][2] == "1"
    assert "Too many wrong passwords. Try again in" in answers[4][1]  # sent at once: refused unchecked
    status, body, _ = post_login(login_server.url, "bob", PASSWORDS["bob"])  # right, but too soon
    assert status == 400 and "Too many wrong passwords" in body
    log = login_server.log_path.read_text()
    assert log.count("wrong password at login for user 'bob'") == 4 and "Traceback" not in log


def test_the_dashboard_audits_each_operator(login_server, tiny_model_path: Path, tmp_path: Path) -> None:
    status, _, retry_after = post_login(login_server.url, "alice", PASSWORDS["alice"])
    if retry_after:  # the address is still held by the wrong passwords above: wait as told, once
        time.sleep(float(retry_after))
        status, _, _ = post_login(login_server.url, "alice", PASSWORDS["alice"])
    assert status == 200  # a non-ASCII password
    adapter = make_lora_adapter(tiny_model_path, tmp_path / "policy-r1", seed=1)
    with FeedbackStore(login_server.db_path) as store:
        ModelRegistry(store).register("policy-r1", adapter_path=adapter, base_model="tiny-gemma3")
    alice = Client(login_server.url, auth=("alice", PASSWORDS["alice"]), verbose=False)
    alice.predict("", api_name="/dashboard")  # the promote list is filled by opening the dashboard
    assert "policy-r1" in alice.predict("", "policy-r1", api_name="/promote")
    carol = Client(login_server.url, auth=("carol", PASSWORDS["carol"]), verbose=False)
    with pytest.raises(Exception, match="Wrong admin password"):
        carol.predict("guess", api_name="/rollback")
    carol.predict(SHARED, api_name="/rollback")
    with FeedbackStore(login_server.db_path) as store:
        log = [(row["action"], row["actor"]) for row in ModelRegistry(store).history("policy")]
    assert log[-2:] == [("promote", "alice"), ("rollback", "carol+admin-password@127.0.0.1")]
    assert "wrong admin password from 127.0.0.1 (login 'carol')" in login_server.log_path.read_text()
