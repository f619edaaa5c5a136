"""`alignloop db ...` through the real command line parser."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from feedback_db.cli import app

runner = CliRunner()

ROWS = [
    {"prompt": "\n\nHuman: What is the capital of Peru?\n\nAssistant:", "chosen": " Lima.", "rejected": " Cusco, I think."},
    {"prompt": "\n\nHuman: Help me hurt someone.\n\nAssistant:", "chosen": " I can't help with that.", "rejected": " Sure."},
]


def test_init_import_export_round_trip_and_stats(tmp_path):
    db = tmp_path / "cli.db"
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out.jsonl"

    result = runner.invoke(app, ["init", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "schema version" in result.output

    result = runner.invoke(app, ["import", "--kind", "preferences", str(src), "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "2 rows read" in result.output

    result = runner.invoke(app, ["export", "--kind", "preferences", "--format", "trl", "-o", str(out), "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == ROWS

    result = runner.invoke(app, ["stats", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["counts"]["comparisons"] == 2

    result = runner.invoke(app, ["versions", "--db", str(db)])
    assert "external:pairs" in result.output


def test_export_says_what_it_dropped_and_exports_thumbs(tmp_path):
    from feedback_db import FeedbackStore, ModelRegistry, Reply

    db = tmp_path / "cli.db"
    with FeedbackStore(db) as store:
        version = ModelRegistry(store).ensure_base_policy("tiny")
        u = store.ensure_user("alice")
        conv = store.create_conversation(u)
        q = store.add_user_message(conv, u, "Capital of France?")
        paris, same, lyon = (store.add_reply(conv, u, q, t, Reply(version.id, finish_reason="stop"))
                             for t in ("Paris.", "Paris.", "Lyon."))
        store.record_ranking(u, [paris, same, lyon])  # Paris = Paris, and Lyon under a repeated Paris
        store.record_rating(u, lyon, 1)
        store.record_rating(u, lyon, -1)

    result = runner.invoke(app, ["export", "--kind", "preferences", "--no-thumbs", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["chosen"][0]["content"] for line in result.stdout.splitlines()] == ["Paris."]
    assert result.stderr.strip() == "1 preferences rows at snapshot 7; dropped 2 (identical_texts 2)"

    result = runner.invoke(app, ["export", "--kind", "thumbs", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Lyon."}], "label": False, "ended": True}]
    assert result.stderr.strip() == "1 thumbs rows at snapshot 7; dropped 1 (superseded_by_same_user 1)"


def test_errors_are_clear_and_exit_nonzero(tmp_path):
    db = tmp_path / "cli.db"
    result = runner.invoke(app, ["stats", "--db", str(db)])
    assert result.exit_code == 1 and "alignloop db init" in result.output
    runner.invoke(app, ["init", "--db", str(db)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n')
    result = runner.invoke(app, ["import", "--kind", "preferences", str(bad), "--db", str(db)])
    assert result.exit_code == 1 and "no 'prompt'" in result.output
    result = runner.invoke(app, ["export", "--kind", "nonsense", "--db", str(db)])
    assert result.exit_code == 1 and "sft, preferences, thumbs or prompts" in result.output


def test_every_command_has_help_with_an_example():
    for cmd in ["init", "stats", "export", "import", "versions"]:
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output
