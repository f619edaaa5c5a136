"""The Gradio handlers through gradio_client against a running app (tiny model, real SQLite)."""

from __future__ import annotations


import pytest
from gradio_client import Client

from tests.app_server import ADMIN_PASSWORD, count_rows, fetch_rows



@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server.url, verbose=False)


def test_api_lists_the_handlers(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/regenerate", "/like", "/feedback", "/demonstrate", "/compare", "/vote_A", "/rank",
            "/submit_ranking", "/dashboard", "/promote", "/rollback"} <= endpoints


def test_chat_then_demonstration(client, app_server):
    before = count_rows(app_server.db_path, "SELECT COUNT(*) FROM messages WHERE role = 'assistant'")
    outputs = client.predict("Hello from the API", [], "", 0.0, 0.95, 16, api_name="/chat")
    box, history, status = outputs[0], outputs[1], outputs[-1]
    assert box == "" and history[0]["content"] in ("Hello from the API", [{"type": "text", "text": "Hello from the API"}])
    assert count_rows(app_server.db_path, "SELECT COUNT(*) FROM messages WHERE role = 'assistant'") == before + 1
    (reason,), = fetch_rows(app_server.db_path, "SELECT finish_reason FROM messages WHERE role = 'assistant' "
                                                "ORDER BY id DESC LIMIT 1")
    cut = "The reply reached the token limit and was cut off (raise Max new tokens in Settings)."
    assert len(history) == 2 and status == ("✂️ " + cut if reason == "length" else "")
    client.predict("A much better reply.", api_name="/demonstrate")
    assert count_rows(app_server.db_path, "SELECT COUNT(*) FROM demonstrations WHERE content = ?",
                  ["A much better reply."]) == 1


def test_compare_vote_reveals_versions(client, app_server):
    a, b, _ = client.predict("Name a fruit", "", 0.8, 0.95, 16, api_name="/compare")
    assert isinstance(a, str) and isinstance(b, str)
    (reveal,) = [client.predict(api_name="/vote_B")]
    assert "base:" in reveal
    assert count_rows(app_server.db_path, "SELECT COUNT(*) FROM comparisons WHERE choice = 'B'") >= 1


def test_rank_and_submit(client, app_server):
    outputs = client.predict("Tell me a joke", 3, "", 0.9, 0.95, 16, api_name="/rank")
    replies = [o for o in outputs if isinstance(o, str)]
    assert len(replies) >= 3
    result = client.predict("2", "1", "3", None, None, None, None, None, None, api_name="/submit_ranking")
    assert "saved" in result
    assert count_rows(app_server.db_path, "SELECT COUNT(*) FROM rankings WHERE k = 3") >= 1


def test_input_limit_and_bad_ranking_are_refused(client):
    with pytest.raises(Exception, match="limit"):
        client.predict("x" * 5000, [], "", 0.0, 0.95, 16, api_name="/chat")
    client.predict("Another", 2, "", 0.9, 0.95, 16, api_name="/rank")
    with pytest.raises(Exception, match="different rank"):
        client.predict("1", "1", None, None, None, None, None, None, None, api_name="/submit_ranking")


def test_dashboard_needs_the_admin_password(client):
    with pytest.raises(Exception, match="admin password"):
        client.predict("wrong", api_name="/dashboard")
    outputs = client.predict(ADMIN_PASSWORD, api_name="/dashboard")
    assert any(isinstance(o, str) and "Live:" in o for o in outputs)


def test_dashboard_shows_a_round_report(client, app_server, tmp_path):
    """A round's Markdown report and its plots, read through the admin-only dashboard."""
    from PIL import Image

    from feedback_db import FeedbackStore, ModelRegistry

    report = tmp_path / "round" / "report.md"
    report.parent.mkdir()
    report.write_text("# Training round 1: succeeded\n\n| data | 3 pairs |\n\n![curve](ppo_curves.png)\n")
    Image.new("RGB", (8, 8), "red").save(report.parent / "ppo_curves.png")
    with FeedbackStore(app_server.db_path) as store:
        reg = ModelRegistry(store)
        r = reg.start_round({"test": True}, store.snapshot())
        reg.finish_round(r.id, "succeeded", report_path=report)
    with pytest.raises(Exception, match="admin password"):
        client.predict("wrong", r.id, api_name="/round_report")
    text, plots = client.predict(ADMIN_PASSWORD, r.id, api_name="/round_report")
    assert "Training round 1" in text and "![" not in text
    assert len(plots) == 1


def test_dashboard_shows_the_running_rounds_progress(client, app_server):
    from feedback_db import FeedbackStore, ModelRegistry

    with FeedbackStore(app_server.db_path) as store:
        reg = ModelRegistry(store)
        r = reg.start_round({"test": "progress"}, store.snapshot())
        reg.record_progress(r.id, {"step": "ppo", "what": "PPO", "done": 5, "total": 20, "eta_s": 240})
    try:
        summary = next(o for o in client.predict(ADMIN_PASSWORD, api_name="/dashboard")
                       if isinstance(o, str) and "Live:" in o)
        assert f"**Training:** round {r.id}" in summary and "PPO-ptx, 5/20 (25%), about 4 min left" in summary
    finally:
        with FeedbackStore(app_server.db_path) as store:
            ModelRegistry(store).finish_round(r.id, "stopped")


def test_dashboard_shows_the_leaderboard(client):
    outputs = client.predict(ADMIN_PASSWORD, api_name="/dashboard")
    board = outputs[-1]
    assert board["headers"] == ["rank", "version", "rating", "95% interval", "votes", "won/lost/tied"]


def test_an_operator_starts_a_round_from_the_dashboard(client, app_server):
    """One round at a time, in the background, with its log beside the rounds; a stranger cannot start one."""
    import time

    with pytest.raises(Exception, match="admin password"):
        client.predict("wrong", api_name="/start_round")
    started = client.predict(ADMIN_PASSWORD, api_name="/start_round")
    assert "Round started by" in started
    with pytest.raises(Exception, match="already running"):
        client.predict(ADMIN_PASSWORD, api_name="/start_round")
    log = app_server.db_path.parent / "rounds" / "dashboard-round.log"
    deadline = time.monotonic() + 300
    while "round " not in (log.read_text() if log.exists() else "") or \
            count_rows(app_server.db_path, "SELECT COUNT(*) FROM training_rounds WHERE status = 'running'"):
        assert time.monotonic() < deadline, log.read_text()[-2000:] if log.exists() else "no log"
        time.sleep(1)
    print(log.read_text()[-600:])
