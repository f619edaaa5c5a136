"""`alignloop demo` (what `make run` runs): the starter set is seeded, the app serves, round 0 trains beside it."""

from __future__ import annotations

import time
from pathlib import Path

from gradio_client import Client

from scripts.server_process import start_server, stop_server
from tests.app_server import count_rows, fetch_rows
from training.round import starter_rows


def test_demo_seeds_the_starter_set_serves_and_turns_the_loop_once(tiny_model_path: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_path, tmp_path, command="demo", env={"ALIGNLOOP_CACHE": str(tmp_path / "cache")},
                          serve_args=["--max-new-tokens", "8", "--rate-limit", "0", "--train",
                                      "--rounds-dir", str(tmp_path / "rounds"), "--round-set", "rm_floor=0",
                                      "--round-set", "ppo.iterations=2", "--round-set", "ppo.max_new_tokens=8",
                                      "--round-set", "eval_max_new_tokens=4"])
    try:
        db = server.db_path
        assert count_rows(db, "SELECT COUNT(*) FROM demonstrations") == len(starter_rows("sft"))
        assert "starter set:" in server.log()
        reply = Client(server.url, verbose=False).predict("Hi there", [], "", 0.0, 0.95, 8, api_name="/chat")
        assert len(reply[1]) == 2  # the app answers while round 0 trains
        deadline = time.monotonic() + 420
        while count_rows(db, "SELECT COUNT(*) FROM training_rounds WHERE status != 'running'") == 0:
            assert time.monotonic() < deadline, (tmp_path / "rounds" / "demo-round.log").read_text()[-3000:]
            time.sleep(1.0)
        log = (tmp_path / "rounds" / "demo-round.log").read_text()
        assert "round 1 succeeded" in log, log[-3000:]
        assert count_rows(db, "SELECT COUNT(*) FROM model_versions WHERE kind = 'policy' AND status = 'candidate'") == 1
    finally:
        stop_server(server)


def test_a_fresh_install_trains_its_first_aligned_version_and_swaps_to_it(tiny_model_path: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_path, tmp_path, command="demo", env={"ALIGNLOOP_CACHE": str(tmp_path / "cache")},
                          serve_args=["--max-new-tokens", "8", "--rate-limit", "0", "--rounds-dir", str(tmp_path / "rounds"),
                                      "--round-set", "sft.max_length=64"])
    try:
        db = server.db_path
        assert "training the first aligned version in the background" in server.log()
        client = Client(server.url, verbose=False)
        client.predict("Hi there", [], "", 0.0, 0.95, 8, api_name="/chat")  # the bare base answers meanwhile
        deadline = time.monotonic() + 420
        while count_rows(db, "SELECT COUNT(*) FROM registry_log WHERE action = 'promote' AND actor = 'first-run'") == 0:
            assert time.monotonic() < deadline, (tmp_path / "rounds" / "first-run.log").read_text()[-3000:]
            time.sleep(1.0)
        (live_id, adapter, mode), = fetch_rows(db, "SELECT id, adapter_path, json_extract(metrics, '$.mode') "
                                                   "FROM model_versions WHERE kind = 'policy' AND status = 'live'")
        assert adapter and mode == "sft-only"
        (config,), = fetch_rows(db, "SELECT config FROM training_rounds")
        assert '"min_pairs": 1000000000' in config
        time.sleep(1.5)  # the router follows the registry within about a second
        client.predict("Hello again", [], "", 0.0, 0.95, 8, api_name="/chat")
        assert fetch_rows(db, "SELECT model_version_id FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1") \
            == [(live_id,)]
        assert "the first aligned version" in server.log() and "is live" in server.log()
    finally:
        stop_server(server)

    # A second start serves the trained version at once and trains nothing.
    server = start_server(tiny_model_path, tmp_path, command="demo", env={"ALIGNLOOP_CACHE": str(tmp_path / "cache")},
                          serve_args=["--max-new-tokens", "8", "--rate-limit", "0", "--rounds-dir", str(tmp_path / "rounds")])
    try:
        assert "training the first aligned version" not in server.log()
        assert count_rows(server.db_path, "SELECT COUNT(*) FROM training_rounds") == 1
    finally:
        stop_server(server)
