"""The live server attacked as a stranger would: raw HTTP by `fn_index` (scripts/raw_gradio.py), forged
and replayed identities, every handler called from a session that never loaded the page, and a
restart (identities and conversations survive it)."""

from __future__ import annotations

import re

import httpx
import pytest

from scripts.server_process import start_server
from tests.app_server import RAW_SAMPLING as SAMPLING, count_rows, fetch_rows, start_test_server, stop_server
from scripts.raw_gradio import RawGradio

# A refusal names what to do; an exception that escaped a handler shows up as one of these.
PYTHON_ERRORS = re.compile(r"Traceback|(Type|Key|Attribute|Index|Value|Runtime|Assertion)Error|File \"/|went wrong")


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("security")
    box = {"server": start_test_server(tiny_model_path, workdir), "workdir": workdir}
    yield box
    stop_server(box["server"])


@pytest.fixture(scope="module")
def raw(served):
    client = RawGradio(served["server"].url)
    yield client
    client.close()


def load(raw: RawGradio, session: str, saved) -> tuple[str | None, dict, list]:
    """The page-load handler with what the browser keeps: (the browser value it sends back, history)."""
    outcome = raw.call(raw.fn_index(trigger="load"), [saved], session)
    assert outcome.success, outcome.error
    _, browser, history, *_ = outcome.data
    return browser.get("token"), browser, history


def chat(raw: RawGradio, session: str, text: str, conversation_state=None):
    outcome = raw.call(raw.fn_index("chat"), [text, [], conversation_state, *SAMPLING, None], session)
    assert outcome.success, outcome.error
    return outcome.data


def user_of(token: str) -> str:
    return token.rsplit(".", 1)[0]


def test_a_forged_identity_gets_a_new_one_never_the_victims(raw, served) -> None:
    db = served["server"].db_path
    victim = raw.new_session()
    token, _, _ = load(raw, victim, {})
    assert token and user_of(token).startswith("anon-")
    browser = chat(raw, victim, "my private question")[4]
    conversation = browser["conversation_id"]
    assert isinstance(conversation, int) and browser["token"] == token

    victim_id = user_of(token)
    other_id = "anon-" + "0" * 16
    forgeries = [{"token": f"{victim_id}.forged-signature", "conversation_id": conversation},
                 {"user_id": victim_id, "conversation_id": conversation},  # what the old app trusted
                 {"token": victim_id, "conversation_id": conversation},
                 {"token": "importer.x", "conversation_id": conversation},
                 {"token": f"{other_id}.{token.rsplit('.', 1)[1]}", "conversation_id": conversation}]
    for forged in forgeries:
        attacker = raw.new_session()
        new_token, browser, history = load(raw, attacker, forged)
        assert user_of(new_token) != victim_id and history == [] and browser["conversation_id"] is None, forged
        # Asking for the victim's conversation by id from the forged session is refused (by Gradio: the
        # id is not among this session's choices; by the handler: it is not this caller's).
        outcome = raw.call(raw.fn_index("load_conversation"), [conversation, None], attacker)
        assert not outcome.success and re.search("not yours|not in the list of choices", outcome.error)
    reply_id = count_rows(db, "SELECT MAX(id) FROM messages WHERE conversation_id = ? AND role = 'assistant'",
                          [conversation])
    assert count_rows(db, "SELECT COUNT(*) FROM ratings WHERE message_id = ?", [reply_id]) == 0
    assert count_rows(db, "SELECT COUNT(*) FROM users WHERE id = 'importer'") == 0

    # The real token is a bearer credential: the browser that holds it gets its own conversation back.
    same, browser, history = load(raw, raw.new_session(), {"token": token, "conversation_id": conversation})
    assert same == token and browser["conversation_id"] == conversation
    assert "my private question" in str(history)


def test_a_session_that_never_loaded_the_page_is_a_new_user_each_time(raw, served) -> None:
    db = served["server"].db_path
    before = count_rows(db, "SELECT COUNT(*) FROM users")
    a, b = raw.new_session(), raw.new_session()
    chat(raw, a, "first")
    chat(raw, a, "second")  # the same session keeps the identity the server gave it
    chat(raw, b, "third")
    assert count_rows(db, "SELECT COUNT(*) FROM users") == before + 2


def test_every_handler_answers_a_stranger_without_leaking_internals(raw, served) -> None:
    """Each handler, from a fresh session that never loaded the page, with each input at its component's
    default value (what Gradio's own checks let through to the handler): an answer or a readable refusal,
    never a traceback or an exception name. Then with None everywhere: Gradio refuses what it cannot
    preprocess, still without a traceback. The server stays healthy."""
    called = 0
    for dep in raw.dependencies:
        if not dep.get("backend_fn"):
            continue
        defaults = [c.get("props", {}).get("value") for c in raw.inputs_of(dep["id"])]
        outcome = raw.call(dep["id"], defaults, raw.new_session())
        called += 1
        assert outcome.status_code == 200, (dep.get("api_name"), outcome.error)
        if not outcome.success:
            assert not PYTHON_ERRORS.search(outcome.error or ""), (dep["id"], dep.get("api_name"), outcome.error)
        nothing = raw.call(dep["id"], [None] * len(dep["inputs"]), raw.new_session())
        assert nothing.success or not re.search(r"Traceback|File \"/", nothing.error or ""), nothing.error
    assert called >= 15
    # Refusals are one log line each: no traceback through our handlers in the server log (Gradio itself
    # logs one when it cannot preprocess the None inputs above).
    log = served["server"].log_path.read_text(errors="replace")
    assert "handler failed" not in log and '/chat_app/' not in log.replace("chat_app.", ""), log[-3000:]
    health = httpx.get(served["server"].url + "healthz", timeout=10)
    assert health.status_code == 200 and health.json()["ready"] is True


def test_a_replayed_vote_counts_once(raw, served) -> None:
    db = served["server"].db_path
    session = raw.new_session()
    outcome = raw.call(raw.fn_index("compare"), ["Name a colour", *SAMPLING, None], session)
    assert outcome.success, outcome.error
    before = count_rows(db, "SELECT COUNT(*) FROM comparisons")
    first = raw.call(raw.fn_index("vote_A"), [None, None], session)
    assert first.success, first.error
    again = raw.call(raw.fn_index("vote_A"), [None, None], session)
    elsewhere = raw.call(raw.fn_index("vote_B"), [None, None], raw.new_session())
    assert not again.success and not elsewhere.success
    assert count_rows(db, "SELECT COUNT(*) FROM comparisons") == before + 1


def test_pressing_the_same_button_twice_stores_once(raw, served) -> None:
    """👍 twice, "Save feedback" twice and the same demonstration twice each store one row; a changed
    rating is stored (the latest counts)."""
    db = served["server"].db_path
    session = raw.new_session()
    chat(raw, session, "rate me")
    like, feedback, demo = raw.fn_index("like"), raw.fn_index("feedback"), raw.fn_index("demonstrate")
    ratings = "SELECT COUNT(*) FROM ratings"
    before = count_rows(db, ratings)
    for _ in range(2):
        assert raw.call(like, [None, None], session, event_data={"index": 1, "value": "", "liked": True}).success
    assert count_rows(db, ratings) == before + 1
    for _ in range(2):
        assert raw.call(feedback, [None, ["helpful"], "nice", None], session).success
    assert count_rows(db, ratings) == before + 2
    assert raw.call(like, [None, None], session, event_data={"index": 1, "value": "", "liked": False}).success
    assert count_rows(db, ratings) == before + 3
    demos = "SELECT COUNT(*) FROM demonstrations WHERE content = 'A better reply.'"
    for _ in range(2):
        assert raw.call(demo, [None, "A better reply.", None], session).success
    assert count_rows(db, demos) == 1


def test_healthz_and_metrics_name_the_live_version(served) -> None:
    body = httpx.get(served["server"].url + "healthz", timeout=10).json()
    assert body == {"live": True, "ready": True, "live_version": "base:tiny-gemma3", "candidate_version": None,
                    "engine": "hf"}
    metrics = httpx.get(served["server"].url + "metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'alignloop_version_info{role="live",version="base:tiny-gemma3"} 1.0' in metrics.text
    assert 'alignloop_requests_total{kind="chat",outcome="ok"}' in metrics.text  # earlier tests chatted


def test_every_admin_handler_refuses_a_stranger_and_changes_nothing(raw, served) -> None:
    """Every handler whose first input is the admin password box, the `api_name=False` ones included,
    called by fn_index with no password and with a wrong one: refused with a readable reason, and the
    registry, the rounds and the live version are as before."""
    db = served["server"].db_path
    password_boxes = {c["id"] for c in raw.components.values()
                      if c.get("type") == "textbox" and c.get("props", {}).get("type") == "password"}
    guarded = [dep for dep in raw.dependencies if dep.get("backend_fn") and dep["inputs"]
               and dep["inputs"][0] in password_boxes]
    names = {dep.get("api_name") for dep in guarded}
    assert {"dashboard", "promote", "rollback", "start_round", "round_report"} <= names and len(guarded) >= 8
    state = ("SELECT (SELECT COUNT(*) FROM registry_log) || '/' || (SELECT COUNT(*) FROM training_rounds)"
             " || '/' || (SELECT name FROM model_versions WHERE status = 'live' AND kind = 'policy')")
    before = fetch_rows(db, state)
    for dep in guarded:
        inputs = [c.get("props", {}).get("value") for c in raw.inputs_of(dep["id"])]
        for password in ("", "wrong-password"):
            outcome = raw.call(dep["id"], [password, *inputs[1:]], raw.new_session())
            assert not outcome.success, (dep.get("api_name"), password)
            assert re.search("password|admin|log in|too many", outcome.error or "", re.I), outcome.error
            assert not PYTHON_ERRORS.search(outcome.error or ""), outcome.error
    assert fetch_rows(db, state) == before


def test_identities_and_conversations_survive_a_restart(raw, served, tiny_model_path) -> None:
    session = raw.new_session()
    token, _, _ = load(raw, session, {})
    conversation = chat(raw, session, "remember me")[4]["conversation_id"]
    stop_server(served["server"])
    served["server"] = start_test_server(tiny_model_path, served["workdir"])
    after = RawGradio(served["server"].url)
    try:
        same, browser, history = load(after, after.new_session(), {"token": token, "conversation_id": conversation})
    finally:
        after.close()
    assert same == token and browser["conversation_id"] == conversation and "remember me" in str(history)


def test_one_address_gets_few_identities_and_requests_cost_what_they_generate(tiny_model_path, tmp_path) -> None:
    """Opening new sessions does not buy new voters or replies: new identities are limited per address,
    and generated replies per identity and per address (4x), a Compare costing 2."""
    server = start_server(tiny_model_path, tmp_path, engine="hf",
                          serve_args=["--max-new-tokens", "4", "--rate-limit", "3", "--new-ids-per-hour", "5"],
                          env={"ALIGNLOOP_CACHE": str(tmp_path / "cache")})
    raw = RawGradio(server.url)
    try:
        s = [raw.new_session() for _ in range(6)]
        chat(raw, s[0], "hello")
        battle = raw.call(raw.fn_index("compare"), ["Name a fruit", *SAMPLING, None], s[0])
        assert battle.success, battle.error  # 1 + 2 = 3 of 3
        over = raw.call(raw.fn_index("chat"), ["hello", [], None, *SAMPLING, None], s[0])
        assert not over.success and "3 generated replies a minute for you" in over.error
        for session in s[1:4]:
            for _ in range(3):
                chat(raw, session, "hello")  # the address: 3 + 9 = 12 of 12
        full = raw.call(raw.fn_index("chat"), ["hello", [], None, *SAMPLING, None], s[4])
        assert not full.success and "for your address" in full.error
        sixth = raw.call(raw.fn_index("chat"), ["hello", [], None, *SAMPLING, None], s[5])
        assert not sixth.success and "Too many new sessions" in sixth.error
        assert count_rows(server.db_path, "SELECT COUNT(*) FROM messages WHERE role = 'assistant'") == 12
    finally:
        raw.close()
        stop_server(server)
