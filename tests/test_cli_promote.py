"""`alignloop promote` / `alignloop rollback` on a real database."""

from __future__ import annotations

from typer.testing import CliRunner

from chat_app.cli import app
from feedback_db import FeedbackStore, ModelRegistry

runner = CliRunner()


def test_promote_and_rollback_from_the_command_line(tmp_path):
    db = tmp_path / "f.db"
    with FeedbackStore(db) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-r1", adapter_path="/a/r1", base_model="tiny")
    result = runner.invoke(app, ["promote", "policy-r1", "--db", str(db)])
    assert result.exit_code == 0 and "policy-r1 is live" in result.output
    result = runner.invoke(app, ["promote", "policy-r1", "--db", str(db)])
    assert result.exit_code == 1 and "already live" in result.output
    result = runner.invoke(app, ["rollback", "--db", str(db)])
    assert result.exit_code == 0 and "base:tiny is live again" in result.output
    with FeedbackStore(db) as store:
        assert ModelRegistry(store).live().name == "base:tiny"
    result = runner.invoke(app, ["rollback", "--db", str(db)])
    assert result.exit_code == 1 and "no earlier live" in result.output
