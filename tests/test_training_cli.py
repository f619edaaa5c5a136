"""`alignloop train sft|rm|ppo`: the CLI builds the same dataclass configs as the Python API."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from training.cli import train_app

runner = CliRunner()


def test_show_config_applies_options_and_overrides(tmp_path: Path) -> None:
    result = runner.invoke(train_app, ["rm", "prefs.jsonl", "-o", str(tmp_path / "rm"), "--set", "lora.r=8",
                                       "--set", "lr=3e-4", "--set", "progress=false", "--show-config"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert cfg["data"] == "prefs.jsonl" and cfg["lora"]["r"] == 8 and cfg["lr"] == 3e-4 and cfg["progress"] is False


def test_bad_override_says_which_fields_exist() -> None:
    result = runner.invoke(train_app, ["sft", "sft.jsonl", "--set", "learning_rate=1"])
    assert result.exit_code == 1
    assert "no field 'learning_rate'" in result.output and "lr" in result.output


def test_config_file_round_trip_and_sft_run(tiny_model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "Say thanks", "completion": "Thanks for your help!"}) + "\n")
    out = tmp_path / "sft"
    result = runner.invoke(train_app, ["sft", str(data), "-o", str(out), "--base-model", str(tiny_model_path),
                                       "--set", "epochs=2", "--set", "batch_size=1", "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    assert "SFT adapter:" in result.output and (out / "adapter_model.safetensors").is_file()
    again = runner.invoke(train_app, ["sft", str(data), "--config", str(out / "train_config.json"), "--show-config"])
    assert json.loads(again.output)["epochs"] == 2.0
    refused = runner.invoke(train_app, ["sft", str(data), "--config", str(out / "train_config.json")])
    assert refused.exit_code == 1 and "not empty" in refused.output


def test_rm_takes_thumbs_with_or_without_pairs(tmp_path: Path) -> None:
    result = runner.invoke(train_app, ["rm", "--thumbs-data", "thumbs.jsonl", "-o", str(tmp_path / "rm"),
                                       "--set", "pointwise_weight=0.25", "--show-config"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert cfg["thumbs_data"] == "thumbs.jsonl" and cfg["data"] == "" and cfg["pointwise_weight"] == 0.25
    refused = runner.invoke(train_app, ["rm", "-o", str(tmp_path / "rm2")])
    assert refused.exit_code == 1 and "thumbs_data" in refused.output


def test_ppo_sampler_option_and_the_factory_from_the_top_level_app(tmp_path: Path, monkeypatch) -> None:
    """`alignloop train ppo` passes on the sampler factory that the top-level app puts in the context."""
    import training.ppo

    shown = runner.invoke(train_app, ["ppo", "prompts.jsonl", "--reward-adapter", "rm", "--sampler", "vllm",
                                      "--show-config"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["sampler"] == "vllm"
    bad = runner.invoke(train_app, ["ppo", "prompts.jsonl", "--reward-adapter", "rm", "--sampler", "fast"])
    assert bad.exit_code == 1 and "'auto', 'vllm', 'hf'" in bad.output

    seen = {}

    def fake_train_ppo(cfg, reward_fn=None, sampler_factory=None):
        seen["factory"] = sampler_factory
        raise training.ppo.ConfigError("stop here")

    def factory(cfg, ctx):  # what chat_app's vllm_sampler_factory stands for
        raise AssertionError("not called by the CLI itself")

    monkeypatch.setattr(training.ppo, "train_ppo", fake_train_ppo)
    result = runner.invoke(train_app, ["ppo", "prompts.jsonl", "--reward-adapter", "rm", "-o", str(tmp_path / "p")],
                           obj={"ppo_sampler_factory": factory})
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen["factory"] is factory
