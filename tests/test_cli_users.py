"""`alignloop users add|list|remove`, and `serve` refusing passwords on its command line."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chat_app.auth import UserDirectory, UsersFile
from chat_app.cli import app

runner = CliRunner()
PASSWORD = "mot de passe très long ✓"


def plain(output: str) -> str:
    """CLI output without rich's error box and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_users_add_list_remove(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    result = runner.invoke(app, ["users", "add", "alice", "--admin", "--password-stdin", "--file", str(users)],
                           input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert "added alice (admin)" in result.output and PASSWORD not in result.output
    assert stat.S_IMODE(users.stat().st_mode) == 0o600 and PASSWORD not in users.read_text(encoding="utf-8")
    result = runner.invoke(app, ["users", "add", "bob", "--password-stdin"], input="bob's password\n",
                           env={"ALIGNLOOP_USERS_FILE": str(users)})
    assert result.exit_code == 0, result.output
    directory = UserDirectory.load(users)
    assert directory.verify("alice", PASSWORD) and directory.verify("bob", "bob's password")
    assert directory.admin_names() == {"alice"}

    result = runner.invoke(app, ["users", "list", "--file", str(users)])
    assert result.exit_code == 0
    assert [line.split("\t")[:2] for line in result.output.splitlines()] == [["alice", "admin"], ["bob", "user"]]

    result = runner.invoke(app, ["users", "add", "bob", "--password-stdin", "--file", str(users)], input="another one\n")
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(app, ["users", "add", "bob", "--update", "--password-stdin", "--file", str(users)],
                           input="another one\n")
    assert result.exit_code == 0 and UserDirectory.load(users).verify("bob", "another one")

    result = runner.invoke(app, ["users", "remove", "bob", "--file", str(users)])
    assert result.exit_code == 0 and list(UsersFile(users).read()) == ["alice"]
    result = runner.invoke(app, ["users", "remove", "bob", "--file", str(users)])
    assert result.exit_code == 1 and "No user 'bob'" in result.output


def test_users_add_refuses_a_short_password_and_writes_nothing(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    result = runner.invoke(app, ["users", "add", "carol", "--password-stdin", "--file", str(users)], input="short\n")
    assert result.exit_code == 1 and "at least 8" in result.output and not users.exists()


def test_users_file_defaults_to_beside_the_database(tmp_path: Path) -> None:
    result = runner.invoke(app, ["users", "add", "dave", "--password-stdin"], input="dave's password\n",
                           env={"ALIGNLOOP_DB": str(tmp_path / "data" / "feedback.db"), "ALIGNLOOP_USERS_FILE": None})
    assert result.exit_code == 0, result.output
    assert "dave" in UsersFile(tmp_path / "data" / "users.json").read()


@pytest.mark.parametrize("argv, hint", [
    (["--users", "alice:pw1,bob:pw2"], "alignloop users add NAME"),
    (["--admin-password", "s3cret"], "ALIGNLOOP_ADMIN_PASSWORD"),
])
def test_serve_refuses_passwords_on_the_command_line(argv: list[str], hint: str) -> None:
    result = runner.invoke(app, ["serve", *argv])
    assert result.exit_code == 2 and "(`ps`)" in plain(result.output) and hint in plain(result.output)


def test_serve_refuses_a_missing_users_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--users-file", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "There is no users file" in plain(result.output)


def test_the_admin_password_from_the_environment_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from chat_app.cli import _app_config

    monkeypatch.setenv("ALIGNLOOP_ADMIN_PASSWORD", "from the environment")
    config = _app_config(base_model="default", engine="hf", db=None, host="127.0.0.1", port=7860, users_file=None,
                         admins=None, users=None, admin_password=None, max_model_len=512, rate_limit=0, new_ids_per_hour=60,
                         max_input_chars=4000, max_new_tokens=16, frequency_penalty=0.5, min_p=0.1, auto_promote_after=0, promote_alpha=0.05,
                         promote_min_voters=5)
    assert config.admin_password is None  # the server reads $ALIGNLOOP_ADMIN_PASSWORD itself


def test_users_key_prints_a_key_once_and_revokes_it(tmp_path: Path) -> None:
    from chat_app.auth import ApiKeyDirectory

    users = tmp_path / "users.json"
    UsersFile(users).add("alice", PASSWORD)
    result = runner.invoke(app, ["users", "key", "alice", "--file", str(users)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    assert key.startswith("alk-") and ApiKeyDirectory(users).owner(key) == "alice"
    key_id = key.split("-")[1]
    listed = runner.invoke(app, ["users", "list", "--file", str(users)]).output
    assert f"API keys: {key_id}" in listed and key not in listed
    result = runner.invoke(app, ["users", "key", "alice", "--revoke", key_id, "--file", str(users)])
    assert result.exit_code == 0 and ApiKeyDirectory(users).owner(key) is None
    result = runner.invoke(app, ["users", "key", "nobody", "--file", str(users)])
    assert result.exit_code == 1 and "alignloop users add nobody" in plain(result.output)
