"""Fault test (issue #10): the server is SIGKILLed while clients write. Every write it acknowledged is in
the database afterwards, the file passes SQLite's integrity check, and a server restarted on it serves
and stores again.

A write is acknowledged when its handler's `process_completed` arrived with success: the handler returns
only after the store committed, so a write the server said it took must survive the kill (WAL +
synchronous=NORMAL survives a killed process; feedback_db/connection.py)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from scripts.raw_gradio import RawGradio
from feedback_db import FeedbackStore
from tests.app_server import RAW_SAMPLING as SAMPLING, count_rows, fetch_rows, start_test_server, stop_server

CLIENTS = 4
ACKNOWLEDGED_BEFORE_KILL = 40  # writes acknowledged before the kill: a run that wrote little proves nothing
WRITING_DEADLINE_S = 40.0


@dataclass
class Acknowledged:
    """What the server said it stored, by all clients (append under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # The page gets no database ids (they stay in the session's server-side state), so a write is found by
    # its text, unique to the client and turn: the message a reply answers, a demonstration's content.
    replies: list[tuple[str, str]] = field(default_factory=list)  # (user id, the message it answers)
    ratings: Counter = field(default_factory=Counter)  # (user id, the message, value) -> times acknowledged
    demonstrations: list[tuple[str, str]] = field(default_factory=list)  # (user id, its text)
    in_flight: int = 0  # calls sent and not yet answered
    errors: list[str] = field(default_factory=list)  # refusals before the kill: the run is not a fair test

    def count(self) -> int:
        with self.lock:
            return len(self.replies) + sum(self.ratings.values()) + len(self.demonstrations)


def _write_until_killed(raw: RawGradio, client: int, acked: Acknowledged, killed: threading.Event) -> None:
    """One browser session: chat a turn, 👍 then 👎 its reply, write a better reply; again, until the
    server is gone. Each acknowledged write is recorded as soon as its answer arrives."""
    session = raw.new_session()
    chat, like, demonstrate = raw.fn_index("chat"), raw.fn_index("like"), raw.fn_index("demonstrate")

    def call(fn_index: int, data: list, event_data: dict | None = None):
        with acked.lock:
            acked.in_flight += 1
        try:
            outcome = raw.call(fn_index, data, session, event_data=event_data)
            why = outcome.error
        except httpx.HTTPError as exc:  # the connection died under the call
            outcome, why = None, repr(exc)
        finally:
            with acked.lock:
                acked.in_flight -= 1
        if outcome is not None and outcome.success:
            return outcome
        if not killed.is_set():  # after the kill, every call fails: that is expected
            with acked.lock:
                acked.errors.append(f"client {client}: {why}")
        return None

    history: list = []  # the chat as the page shows it, sent back with the next message as a browser does
    for turn in itertools.count():
        text = f"client {client} turn {turn}"
        if (sent := call(chat, [text, history, None, *SAMPLING, None])) is None:
            return
        history, browser = sent.data[1], sent.data[4]
        user_id = browser["token"].rsplit(".", 1)[0]  # the signed token of the session's anonymous identity
        with acked.lock:
            acked.replies.append((user_id, text))
        for liked, value in ((True, 1), (False, -1)):
            if call(like, [None, None], {"index": len(history) - 1, "value": "", "liked": liked}) is None:
                return
            with acked.lock:
                acked.ratings[(user_id, text, value)] += 1
        better = f"A better reply, from client {client} at turn {turn}."
        if call(demonstrate, [None, better, None]) is None:
            return
        with acked.lock:
            acked.demonstrations.append((user_id, better))


def _client(raw: RawGradio, client: int, acked: Acknowledged, killed: threading.Event) -> None:
    """A client thread: an unexpected exception fails the test instead of ending the thread quietly."""
    try:
        _write_until_killed(raw, client, acked, killed)
    except Exception as exc:
        with acked.lock:
            acked.errors.append(f"client {client}: {exc!r}")


def _sigkill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (the server was not started in a process
    group of its own: killpg would hit pytest)."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=30)


def _missing(db: Path, acked: Acknowledged) -> list[str]:
    """The acknowledged writes that are not in the database."""
    reply_to = ("FROM messages q JOIN messages r ON r.parent_id = q.id AND r.role = 'assistant' "
                "WHERE q.role = 'user' AND q.user_id = ? AND q.content = ?")
    missing = []
    for user_id, text in acked.replies:
        if count_rows(db, f"SELECT COUNT(*) {reply_to} AND r.user_id = q.user_id", [user_id, text]) != 1:
            missing.append(f"the reply to {text!r}")
    for (user_id, text, value), times in acked.ratings.items():
        stored = count_rows(db, f"SELECT COUNT(*) FROM ratings WHERE user_id = ? AND value = ? "
                                f"AND message_id = (SELECT r.id {reply_to})", [user_id, value, user_id, text])
        if stored < times:  # more is fine: a rating the kill cut off may have been stored, unacknowledged
            missing.append(f"{times - stored} of {times} ratings {value:+d} of the reply to {text!r}")
    for user_id, text in acked.demonstrations:
        if count_rows(db, "SELECT COUNT(*) FROM demonstrations WHERE user_id = ? AND content = ?",
                      [user_id, text]) != 1:
            missing.append(f"the demonstration {text!r}")
    return missing


def test_a_sigkilled_server_loses_no_acknowledged_write(tiny_model_path, tmp_path) -> None:
    server = start_test_server(tiny_model_path, tmp_path)
    acked, killed = Acknowledged(), threading.Event()
    clients = [RawGradio(server.url, timeout=30) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=_client, args=(raw, i, acked, killed), daemon=True)
               for i, raw in enumerate(clients)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WRITING_DEADLINE_S
        while (acked.count() < ACKNOWLEDGED_BEFORE_KILL and time.monotonic() < deadline and not acked.errors
               and any(thread.is_alive() for thread in threads)):
            assert server.process.poll() is None, server.log()
            time.sleep(0.05)
        with acked.lock:
            in_flight_at_kill = acked.in_flight
        killed.set()
        _sigkill_tree(server.process.pid)
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads), "a client still waits on the killed server"
    finally:
        for raw in clients:
            raw.close()
        if server.process.poll() is None:
            stop_server(server)

    assert not acked.errors, acked.errors[:5]
    assert acked.count() >= ACKNOWLEDGED_BEFORE_KILL, (acked.count(), server.log())
    assert in_flight_at_kill >= 1, "no write was in flight at the kill"
    assert fetch_rows(server.db_path, "PRAGMA integrity_check") == [("ok",)]
    assert fetch_rows(server.db_path, "PRAGMA foreign_key_check") == []
    assert _missing(server.db_path, acked) == []

    again = start_test_server(tiny_model_path, tmp_path)  # the same database (tmp_path/feedback.db)
    raw = RawGradio(again.url)
    try:
        after = raw.call(raw.fn_index("chat"), ["after the kill", [], None, *SAMPLING, None], raw.new_session())
        assert after.success, after.error
    finally:
        raw.close()
        stop_server(again)
    assert count_rows(again.db_path, "SELECT COUNT(*) FROM messages WHERE content = 'after the kill'") == 1
    assert _missing(again.db_path, acked) == []


def test_regenerate_answers_a_turn_the_killed_server_left_without_a_reply(tiny_model_path, tmp_path) -> None:
    """The page reopens a conversation on the turn a kill left unanswered; Regenerate answers that turn
    (before, it asked to "send a message first" or regenerated the reply before it)."""
    server = start_test_server(tiny_model_path, tmp_path)
    raw = RawGradio(server.url)
    try:
        first = raw.new_session()
        opened = raw.call(raw.fn_index(trigger="load"), [{}], first)
        assert opened.success, opened.error
        sent = raw.call(raw.fn_index("chat"), ["before the kill", [], None, *SAMPLING, None], first)
        assert sent.success, sent.error
        browser = sent.data[4]
        conversation, user_id = browser["conversation_id"], browser["token"].rsplit(".", 1)[0]
        (reply_id,) = fetch_rows(server.db_path, "SELECT id FROM messages WHERE conversation_id = ? AND role = "
                                                 "'assistant'", [conversation])[0]
        with FeedbackStore(server.db_path) as store:  # what a kill mid-reply leaves: the turn, no reply
            stranded = store.add_user_message(conversation, user_id, "asked as the server died", parent_id=reply_id)

        later = raw.new_session()  # the user comes back after the restart
        reopened = raw.call(raw.fn_index(trigger="load"), [browser], later)
        assert reopened.success, reopened.error
        history = reopened.data[2]
        history = history["value"] if isinstance(history, dict) else history  # a component update, or the value
        assert history[-1]["role"] == "user" and "asked as the server died" in str(history[-1]["content"])
        better = raw.call(raw.fn_index("demonstrate"), [None, "The answer it should have had.", None], later)
        assert better.success, better.error  # "Write a better reply" answers that turn, replacing no reply
        assert fetch_rows(server.db_path, "SELECT user_message_id, replaces_message_id FROM demonstrations "
                                          "WHERE content = 'The answer it should have had.'") == [(stranded, None)]
        regenerated = raw.call(raw.fn_index("regenerate"), [history, None, *SAMPLING, None], later)
        assert regenerated.success, regenerated.error
        assert [m["role"] for m in regenerated.data[0]] == ["user", "assistant", "user", "assistant"]
        assert count_rows(server.db_path, "SELECT COUNT(*) FROM messages WHERE parent_id = ? AND role = 'assistant'",
                          [stranded]) == 1
    finally:
        raw.close()
        stop_server(server)
