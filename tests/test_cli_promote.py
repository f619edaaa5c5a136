"""`alignloop promote` / `alignloop rollback` on a real database, and `promote --wait` against a real server."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from chat_app.cli import app
from feedback_db import FeedbackStore, ModelRegistry
from tests.app_server import start_test_server, stop_server
from tests.engine_contract import make_lora_adapter

runner = CliRunner()


def test_promote_and_rollback_from_the_command_line(tiny_model_path, tmp_path):
    db = tmp_path / "f.db"
    with FeedbackStore(db) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-r1", adapter_path=make_lora_adapter(tiny_model_path, tmp_path / "r1", seed=1),
                     base_model="tiny")
        reg.register("policy-gone", adapter_path=tmp_path / "deleted", base_model="tiny")
    result = runner.invoke(app, ["promote", "policy-gone", "--db", str(db)])
    assert result.exit_code == 1 and "cannot be loaded" in result.output and "nothing changed" in result.output
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


def test_promote_waits_until_the_running_server_serves_the_version(tiny_model_path, tmp_path):
    (tmp_path / "served").mkdir()
    server = start_test_server(tiny_model_path, tmp_path / "served")
    try:
        with FeedbackStore(server.db_path) as store:
            ModelRegistry(store).register("policy-w1", adapter_path=make_lora_adapter(tiny_model_path, tmp_path / "w1",
                                                                                      seed=2),
                                          base_model="tiny-gemma3")
        result = runner.invoke(app, ["promote", "policy-w1", "--db", str(server.db_path), "--wait", server.url])
        assert result.exit_code == 0, result.output
        assert f"{server.url} serves policy-w1 (after" in result.output

        # A promotion in another database: this server never serves it, and --wait says so.
        other = tmp_path / "other.db"
        with FeedbackStore(other) as store:
            ModelRegistry(store).register("policy-x", adapter_path=make_lora_adapter(tiny_model_path, tmp_path / "x",
                                                                                      seed=3))
        result = runner.invoke(app, ["promote", "policy-x", "--db", str(other), "--wait", server.url,
                                     "--wait-seconds", "1"])
        assert result.exit_code == 2 and "still serves 'policy-w1', not policy-x" in result.output
    finally:
        stop_server(server)


def test_promote_refuses_a_damaged_adapter_and_checks_without_torch(tiny_model_path, tmp_path):
    """The check reads the adapter's config and safetensors header only: a cut-short weights file, a config
    that is not peft's, or weights without a tensor are refused with nothing changed, and a whole adapter
    passes, all without importing torch (the CLI runs beside a live server that holds the cores)."""
    import json
    import shutil
    import subprocess
    import sys

    good = make_lora_adapter(tiny_model_path, tmp_path / "good", seed=1)
    cut = Path(shutil.copytree(good, tmp_path / "cut"))
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    not_peft = Path(shutil.copytree(good, tmp_path / "not-peft"))
    (not_peft / "adapter_config.json").write_text(json.dumps({"r": 8}))
    longer = Path(shutil.copytree(good, tmp_path / "longer"))  # overwritten in place, never truncated
    (longer / "adapter_model.safetensors").write_bytes((longer / "adapter_model.safetensors").read_bytes() + b"0" * 64)
    empty = Path(shutil.copytree(good, tmp_path / "empty"))
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (empty / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    db = tmp_path / "f.db"
    with FeedbackStore(db) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        for name, folder in (("policy-cut", cut), ("policy-not-peft", not_peft), ("policy-empty", empty),
                             ("policy-longer", longer)):
            reg.register(name, adapter_path=folder, base_model="tiny")
    for name, why in (("policy-cut", "not fully covered"), ("policy-not-peft", "no peft_type"),
                      ("policy-empty", "no LoRA weights"), ("policy-longer", "not fully covered")):
        result = runner.invoke(app, ["promote", name, "--db", str(db)])
        assert result.exit_code == 1 and why in result.output and "nothing changed" in result.output, result.output
    with FeedbackStore(db) as store:
        assert ModelRegistry(store).live().name == "base:tiny"
    probe = ("import sys; from pathlib import Path; from training.round import check_adapter; "
             f"check_adapter(Path({str(good)!r})); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
