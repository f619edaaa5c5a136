"""Shared test fixtures: a tiny random Gemma 3 model and a scratch database path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma3ForCausalLM folder (with tokenizer and chat template), built once per session.

    Shared by every test: treat it as read-only (copy it before changing anything).
    """
    from training.base_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gemma3")


@pytest.fixture
def tmp_db_path(tmp_path: Path) -> Path:
    """Where a test's feedback database goes (the file is not created)."""
    return tmp_path / "feedback.db"


@pytest.fixture(scope="session")
def app_server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """`alignloop serve` on the tiny model (transformers engine) in a subprocess, shared by the UI tests."""
    from tests.app_server import start_test_server, stop_server

    server = start_test_server(tiny_model_path, tmp_path_factory.mktemp("app"))
    yield server
    stop_server(server)
