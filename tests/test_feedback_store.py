"""The feedback store on real SQLite files: records, validation, idempotency, migrations."""

from __future__ import annotations

import json
import sqlite3

import pytest
import sqlite_utils

from feedback_db import (
    AccessDeniedError,
    FeedbackStore,
    InvalidInputError,
    ModelRegistry,
    NotFoundError,
    RegistryError,
    Reply,
    SchemaVersionError,
    StoreConfig,
    export_preference_groups,
    export_sft,
)
from feedback_db.schema import LATEST_VERSION, MIGRATIONS, current_version, migrate


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        yield s


@pytest.fixture
def chat(store):
    """alice's conversation: one question with three replies from the live base policy."""
    version = ModelRegistry(store).ensure_base_policy("tiny")
    alice = store.ensure_user("alice")
    conv = store.create_conversation(alice, system_prompt="Be brief.")
    q = store.add_user_message(conv, alice, "What is 2+2?")
    replies = [
        store.add_reply(conv, alice, q, text, Reply(version.id, {"temperature": 0.7}, 12.5, 9, 3, "stop"))
        for text in ("4", "Four.", "5")
    ]
    return {"user": alice, "conv": conv, "q": q, "replies": replies, "version": version}


def test_pragmas_and_schema(store):
    db = store.db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == StoreConfig().busy_timeout_ms
    assert store.schema_version == LATEST_VERSION
    assert "sessions" not in db.table_names() and "session_id" not in db["conversations"].columns_dict
    for table in ["users", "conversations", "messages", "ratings", "comparisons", "rankings",
                  "ranking_items", "demonstrations", "model_versions", "training_rounds", "registry_log", "events"]:
        assert table in db.table_names()
    fks = {(fk.column, fk.other_table) for fk in db["messages"].foreign_keys}
    assert ("parent_id", "messages") in fks and ("model_version_id", "model_versions") in fks


def test_migrations_forward_from_v1_keep_data(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    assert migrate(db, target=1) == [1]
    db["users"].insert({"id": "bob", "created_at": "2026-01-01T00:00:00Z"})
    db.close()
    with FeedbackStore(path) as store:  # opening migrates forward
        assert store.schema_version == LATEST_VERSION
        assert store.db["users"].get("bob")["id"] == "bob"
        assert "reply_scores" in store.db.view_names()
        applied = [r["version"] for r in store.db["schema_migrations"].rows]
        assert applied == [v for v, _, _ in MIGRATIONS]
    with FeedbackStore(path) as store:  # and re-opening applies nothing twice
        assert store.db["schema_migrations"].count == len(MIGRATIONS)


def test_migration_6_renames_context_id_and_keeps_the_feedback(tmp_path):
    """A database written before migration 6 (feedback keyed by `context_id`) opens with the same rows
    under `user_message_id`, its indexes and foreign keys renamed, and exports the same pairs."""
    path = tmp_path / "v5.db"
    db = sqlite_utils.Database(path)
    assert migrate(db, target=5) == [1, 2, 3, 4, 5]
    t = "2026-01-01T00:00:00Z"
    for i in range(1, 9):
        db["events"].insert({"id": i, "table_name": "x", "created_at": t})
    db["users"].insert({"id": "ann", "created_at": t})
    db["model_versions"].insert({"id": 1, "name": "base", "kind": "policy", "status": "live", "created_at": t})
    db["conversations"].insert({"id": 1, "user_id": "ann", "source": "rank", "prompt_format": "chat", "created_at": t})
    rows = [(1, None, "user", "Name a fruit.", None), (2, 1, "assistant", "Apple.", 1),
            (3, 1, "assistant", "Car.", 1), (4, 1, "assistant", "Pear.", 1)]
    for event, (mid, parent, role, content, version) in enumerate(rows, start=1):
        db["messages"].insert({"id": mid, "conversation_id": 1, "parent_id": parent, "role": role,
                               "content": content, "user_id": "ann", "model_version_id": version,
                               "finish_reason": "stop" if version else None, "created_at": t, "event_id": event})
    db["comparisons"].insert({"id": 1, "user_id": "ann", "context_id": 1, "message_a": 2, "message_b": 3,
                              "choice": "A", "created_at": t, "event_id": 5})
    db["rankings"].insert({"id": 1, "user_id": "ann", "context_id": 1, "k": 3, "created_at": t, "event_id": 6})
    db["ranking_items"].insert_all([{"ranking_id": 1, "position": p, "message_id": m} for p, m in enumerate([4, 2, 3])])
    db["demonstrations"].insert({"id": 1, "user_id": "ann", "context_id": 1, "content": "Banana.",
                                 "created_at": t, "event_id": 7})
    db.close()
    with FeedbackStore(path) as store:  # opening migrates forward
        sdb = store.db
        for table in ("comparisons", "rankings", "demonstrations"):
            columns = sdb[table].columns_dict
            assert "user_message_id" in columns and "context_id" not in columns
            assert sdb[table].get(1)["user_message_id"] == 1
            assert ("user_message_id", "messages") in {(fk.column, fk.other_table) for fk in sdb[table].foreign_keys}
            assert [i.columns for i in sdb[table].indexes if i.name == f"idx_{table}_user_message_id"] == [["user_message_id"]]
        assert "user_message_id" in sdb["reply_scores"].columns_dict
        (group,), _ = export_preference_groups(store)
        assert group.user_message_id == 1
        best_first = [group.completions[i] for i, _ in group.pairs]
        assert best_first[0] == "Pear."  # the ranking's best, over both others
        assert "Banana." in json.dumps(export_sft(store).rows)  # the demonstration still trains SFT


def test_migration_7_drops_the_unused_sessions_table_and_keeps_the_conversations(tmp_path):
    """A database written before migration 7 keeps its conversations, their messages, indexes and
    foreign keys; only `sessions` and `conversations.session_id` go."""
    path = tmp_path / "v6.db"
    db = sqlite_utils.Database(path)
    assert migrate(db, target=6) == [1, 2, 3, 4, 5, 6]
    t = "2026-01-01T00:00:00Z"
    db["events"].insert({"id": 1, "table_name": "x", "created_at": t})
    db["users"].insert({"id": "ann", "created_at": t})
    db["sessions"].insert({"id": "s1", "user_id": "ann", "created_at": t})
    db["conversations"].insert({"id": 7, "user_id": "ann", "session_id": "s1", "source": "chat",
                                "prompt_format": "chat", "created_at": t, "client_id": "c-7"})
    db["messages"].insert({"id": 1, "conversation_id": 7, "role": "user", "content": "Hi.", "user_id": "ann",
                           "created_at": t, "event_id": 1})
    db.close()
    with FeedbackStore(path) as store:
        sdb = store.db
        assert "sessions" not in sdb.table_names() and "session_id" not in sdb["conversations"].columns_dict
        assert sdb["conversations"].get(7)["client_id"] == "c-7"
        assert {(tuple(i.columns), bool(i.unique)) for i in sdb["conversations"].indexes} == {
            (("client_id",), True), (("user_id",), False)}
        assert {(fk.column, fk.other_table) for fk in sdb["conversations"].foreign_keys} == {("user_id", "users")}
        assert sdb.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert sdb.execute("PRAGMA foreign_key_check").fetchall() == []
        assert store.create_conversation("ann", client_id="c-7") == 7  # the same client id: the same conversation
        assert [m["content"] for m in store.conversation_messages(7)] == ["Hi."]


def test_migration_7_refuses_a_database_whose_own_views_use_sessions(tmp_path):
    """An operator's view over `sessions` would break when the table goes: the upgrade stops with what to
    do, and the database stays at version 6, unchanged."""
    path = tmp_path / "v6.db"
    db = sqlite_utils.Database(path)
    migrate(db, target=6)
    db.execute("CREATE VIEW my_sessions AS SELECT s.id, c.id AS conversation FROM sessions s "
               "JOIN conversations c ON c.session_id = s.id")
    db.close()
    with pytest.raises(SchemaVersionError, match="my_sessions.*drop or rewrite"):
        FeedbackStore(path)
    db = sqlite_utils.Database(path)
    assert current_version(db) == 6 and "sessions" in db.table_names()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    FeedbackStore(path).close()
    db = sqlite_utils.Database(path)
    db["schema_migrations"].insert({"version": LATEST_VERSION + 1, "name": "future", "applied_at": "x"})
    db.close()
    with pytest.raises(SchemaVersionError, match="upgrade alignloop"):
        FeedbackStore(path)


def test_messages_form_a_tree_with_generation_metadata(store, chat):
    u, conv, q = chat["user"], chat["conv"], chat["q"]
    a1 = chat["replies"][0]
    follow = store.add_user_message(conv, u, "And 3+3?", parent_id=a1)
    reply = store.add_reply(conv, u, follow, "6", Reply(chat["version"].id))
    ctx = store.context(reply)
    assert [m["content"] for m in ctx.messages] == ["What is 2+2?", "4", "And 3+3?", "6"]
    assert ctx.as_chat()[0] == {"role": "system", "content": "Be brief."}
    siblings = [m for m in store.conversation_messages(conv) if m["parent_id"] == q]
    assert len(siblings) == 3
    row = store.db["messages"].get(a1)
    assert row["model_version_id"] == chat["version"].id
    assert json.loads(row["sampling"]) == {"temperature": 0.7}
    assert (row["latency_ms"], row["prompt_tokens"], row["completion_tokens"], row["finish_reason"]) == (12.5, 9, 3, "stop")


def test_record_every_kind_of_feedback(store, chat):
    u, q, (a, b, c) = chat["user"], chat["q"], chat["replies"]
    r = store.record_rating(u, a, 1, reasons=["correct", "concise"], comment="nice")
    store.record_rating(u, c, -1, reasons=["wrong"])
    cmp_id = store.record_comparison(u, a, b, "tie")
    rank_id = store.record_ranking(u, [b, a, c])
    demo_id = store.record_demonstration(u, q, "2+2 = 4.", replaces_message_id=c)
    db = store.db
    assert json.loads(db["ratings"].get(r)["reasons"]) == ["correct", "concise"]
    assert db["comparisons"].get(cmp_id)["user_message_id"] == q
    items = [(i["position"], i["message_id"]) for i in db["ranking_items"].rows_where("ranking_id = ?", [rank_id])]
    assert sorted(items) == [(0, b), (1, a), (2, c)]
    assert db["demonstrations"].get(demo_id)["replaces_message_id"] == c
    stats = store.stats()
    assert stats["counts"]["ratings"] == 2 and stats["counts"]["rankings"] == 1
    assert stats["thumbs_by_version"][0]["up_rate"] == 0.5


def test_event_ids_increase_and_snapshot(store, chat):
    u, (a, b, _) = chat["user"], chat["replies"]
    s0 = store.snapshot()
    store.record_rating(u, a, 1)
    store.record_comparison(u, a, b, "A")
    assert store.snapshot() == s0 + 2
    events = [r["event_id"] for r in store.db.query("SELECT event_id FROM ratings UNION ALL SELECT event_id FROM comparisons")]
    assert sorted(events) == [s0 + 1, s0 + 2]


def _counts(store):
    return {t: store.db[t].count for t in ["messages", "ratings", "comparisons", "rankings", "ranking_items",
                                          "demonstrations", "events", "conversations"]}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, c: s.record_rating(c["user"], 99999, 1), NotFoundError, "no message 99999"),
        (lambda s, c: s.record_rating(c["user"], c["q"], 1), InvalidInputError, "user turn"),
        (lambda s, c: s.record_rating(c["user"], c["replies"][0], 2), InvalidInputError, "thumbs"),
        (lambda s, c: s.record_rating(c["user"], c["replies"][0], 1, reasons="bad"), InvalidInputError, "list"),
        (lambda s, c: s.record_rating("mallory", c["replies"][0], -1), AccessDeniedError, "another user"),
        (lambda s, c: s.record_comparison(c["user"], c["replies"][0], c["replies"][0], "A"), InvalidInputError, "two different"),
        (lambda s, c: s.record_comparison(c["user"], c["replies"][0], c["replies"][1], "C"), InvalidInputError, "choice"),
        (lambda s, c: s.record_ranking(c["user"], [c["replies"][0]]), InvalidInputError, "2 to 9"),
        (lambda s, c: s.record_ranking(c["user"], list(range(1, 11))), InvalidInputError, "2 to 9"),
        (lambda s, c: s.record_ranking(c["user"], [c["replies"][0], c["replies"][1], c["replies"][0]]), InvalidInputError, "duplicates"),
        (lambda s, c: s.record_demonstration(c["user"], c["q"], "   "), InvalidInputError, "empty"),
        (lambda s, c: s.record_demonstration(c["user"], c["q"], "x" * 40_000), InvalidInputError, "limit"),
        (lambda s, c: s.record_demonstration(c["user"], c["q"], "bad \udc80 text"), InvalidInputError, "UTF-8"),
        (lambda s, c: s.record_demonstration(c["user"], c["q"], b"\xff\xfe"), InvalidInputError, "UTF-8"),
        (lambda s, c: s.record_demonstration(c["user"], c["replies"][0], "hi"), InvalidInputError, "answers a user"),
        (lambda s, c: s.add_user_message(c["conv"], c["user"], ""), InvalidInputError, "empty"),
        (lambda s, c: s.add_user_message(c["conv"], "mallory", "hi"), AccessDeniedError, "another user"),
        (lambda s, c: s.add_user_message(c["conv"], c["user"], "hi", parent_id=c["q"]), InvalidInputError, "must follow"),
        (lambda s, c: s.add_reply(c["conv"], c["user"], c["q"], "x", Reply(424242)), NotFoundError, "model version"),
        (lambda s, c: s.add_user_message(777, c["user"], "hi"), NotFoundError, "no conversation"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(store, chat, call, error, match):
    store.ensure_user("mallory")
    before = _counts(store)
    with pytest.raises(error, match=match):
        call(store, chat)
    assert _counts(store) == before


def test_comparison_and_ranking_of_different_contexts_are_refused(store, chat):
    u, conv = chat["user"], chat["conv"]
    other_q = store.add_user_message(conv, u, "Another question", parent_id=chat["replies"][0])
    other = store.add_reply(conv, u, other_q, "Another answer", Reply(chat["version"].id))
    before = _counts(store)
    with pytest.raises(InvalidInputError, match="different contexts"):
        store.record_comparison(u, chat["replies"][0], other, "A")
    with pytest.raises(InvalidInputError, match="different contexts"):
        store.record_ranking(u, [chat["replies"][1], other])
    assert _counts(store) == before


def test_another_users_reply_cannot_be_compared(store, chat):
    store.ensure_user("mallory")
    with pytest.raises(AccessDeniedError):
        store.record_comparison("mallory", chat["replies"][0], chat["replies"][1], "A")


def test_repeated_submission_with_same_client_id_is_recorded_once(store, chat):
    u, q, (a, b, c) = chat["user"], chat["q"], chat["replies"]
    ids = {store.record_rating(u, a, 1, client_id="r-1") for _ in range(3)}
    assert len(ids) == 1 and store.db["ratings"].count == 1
    assert store.record_comparison(u, a, b, "A", client_id="c-1") == store.record_comparison(u, a, b, "A", client_id="c-1")
    assert store.record_ranking(u, [a, b, c], client_id="k-1") == store.record_ranking(u, [a, b, c], client_id="k-1")
    assert store.record_demonstration(u, q, "4", client_id="d-1") == store.record_demonstration(u, q, "4", client_id="d-1")
    conv = chat["conv"]
    assert store.add_user_message(conv, u, "again", parent_id=a, client_id="m-1") == \
        store.add_user_message(conv, u, "again", parent_id=a, client_id="m-1")
    counts = _counts(store)
    assert (counts["comparisons"], counts["rankings"], counts["ranking_items"], counts["demonstrations"]) == (1, 1, 3, 1)


def test_database_stays_browsable_with_stock_sqlite(store, chat):
    store.record_rating(chat["user"], chat["replies"][0], 1)
    conn = sqlite3.connect(store.path)
    (score,) = conn.execute("SELECT score FROM reply_scores WHERE message_id = ?", [chat["replies"][0]]).fetchone()
    assert score == 1
    conn.close()


# -- the model registry ------------------------------------------------------------------

def test_registry_promote_and_rollback(store):
    reg = ModelRegistry(store)
    base = reg.ensure_base_policy("tiny")
    assert reg.live().id == base.id
    v1 = reg.register("policy-r1", adapter_path="/adapters/r1", base_model="tiny", parent_id=base.id)
    reg.register("policy-r2", adapter_path="/adapters/r2", base_model="tiny", parent_id=v1.id)
    assert v1.status == "candidate" and [c.name for c in reg.candidates()] == ["policy-r2", "policy-r1"]
    reg.promote(v1.id)
    reg.promote("policy-r2")
    assert reg.live().name == "policy-r2"
    assert {v.name: v.status for v in reg.list("policy")} == {"base:tiny": "retired", "policy-r1": "retired",
                                                              "policy-r2": "live"}
    assert reg.rollback().name == "policy-r1"
    assert reg.rollback().name == "base:tiny"
    with pytest.raises(RegistryError, match="no earlier live"):
        reg.rollback()
    assert reg.live().name == "base:tiny"
    actions = [h["action"] for h in reg.history()]
    assert actions == ["register", "promote", "register", "register", "promote", "promote", "rollback", "rollback"]
    # exactly one live policy at every step
    assert store.db.execute("SELECT COUNT(*) FROM model_versions WHERE kind='policy' AND status='live'").fetchone()[0] == 1


def test_registry_refuses_reused_names_and_unknown_versions(store):
    reg = ModelRegistry(store)
    reg.register("rm-1", kind="reward")
    with pytest.raises(RegistryError, match="never reused"):
        reg.register("rm-1", kind="reward")
    with pytest.raises(NotFoundError):
        reg.promote("nope")
    reg.promote("rm-1")
    with pytest.raises(RegistryError, match="already live"):
        reg.promote("rm-1")
    assert reg.live("reward").name == "rm-1" and reg.live("policy") is None


def test_training_rounds(store):
    reg = ModelRegistry(store)
    r = reg.start_round({"beta": 0.02}, snapshot_event_id=store.snapshot())
    assert r.status == "running"
    r = reg.finish_round(r.id, "succeeded", metrics={"rm_accuracy": 0.71}, report_path="/r/1.html")
    assert (r.status, r.metrics["rm_accuracy"], r.report_path) == ("succeeded", 0.71, "/r/1.html")
    assert [x.id for x in reg.rounds()] == [r.id]
    with pytest.raises(InvalidInputError):
        reg.finish_round(r.id, "maybe")


@pytest.mark.parametrize("finish_reason, match", [("error", "failed"), ("abort", "stopped before it finished")])
def test_failed_or_stopped_replies_cannot_be_voted_on(store, chat, finish_reason, match):
    u, conv, q, (a, b, _) = chat["user"], chat["conv"], chat["q"], chat["replies"]
    bad = store.add_reply(conv, u, q, "Fo", Reply(chat["version"].id, finish_reason=finish_reason))
    before = _counts(store)
    for call in (lambda: store.record_rating(u, bad, 1), lambda: store.record_rating(u, bad, 0),
                 lambda: store.record_comparison(u, a, bad, "A"), lambda: store.record_comparison(u, bad, b, "tie"),
                 lambda: store.record_ranking(u, [a, b, bad])):
        with pytest.raises(InvalidInputError, match=f"{match}.*regenerate"):
            call()
    assert _counts(store) == before
    # a better reply may replace it: that is when one helps most
    store.record_demonstration(u, q, "2+2 = 4.", replaces_message_id=bad)


def test_replies_cut_at_max_tokens_can_be_voted_on(store, chat):
    u, conv, q, (a, _, _) = chat["user"], chat["conv"], chat["q"], chat["replies"]
    cut = store.add_reply(conv, u, q, "Two plus two is", Reply(chat["version"].id, finish_reason="length"))
    store.record_rating(u, cut, -1)
    store.record_comparison(u, a, cut, "A")
    store.record_ranking(u, [a, cut])
    assert (store.db["ratings"].count, store.db["comparisons"].count, store.db["rankings"].count) == (1, 1, 1)


# -- smaller holes of issue #10 row 10 ------------------------------------------------------

@pytest.mark.parametrize("sampling, match", [
    ({"temperature": float("nan")}, "not finite"),
    ({"temperature": float("inf"), "top_p": 0.9}, "not finite"),
    ({"nested": {"penalties": [1.0, -float("inf")]}}, "not finite"),
    ({"stop": ["\ud800"]}, "surrogate"),
    ({"seed": object()}, "JSON cannot store"),
    ([("temperature", 0.7)], "must be a dict"),
])
def test_sampling_that_is_not_valid_json_is_refused(store, chat, sampling, match):
    before = store.snapshot()
    with pytest.raises(InvalidInputError, match=match):
        store.add_reply(chat["conv"], chat["user"], chat["q"], "x", Reply(chat["version"].id, sampling))
    assert store.snapshot() == before
    for (text,) in store.db.execute("SELECT sampling FROM messages WHERE sampling IS NOT NULL"):
        json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c} stored"))


@pytest.mark.parametrize("field, value", [
    ("latency_ms", float("nan")), ("latency_ms", -1.0), ("prompt_tokens", 1.5), ("completion_tokens", "7"),
    ("finish_reason", "\x00"),
])
def test_reply_metadata_must_be_finite_numbers_and_text(store, chat, field, value):
    reply = Reply(chat["version"].id, {"temperature": 0.7}, **{field: value})
    with pytest.raises(InvalidInputError, match=field):
        store.add_reply(chat["conv"], chat["user"], chat["q"], "x", reply)


def test_numpy_scalars_in_reply_metadata_are_stored_as_numbers(store, chat):
    np = pytest.importorskip("numpy")
    reply = Reply(chat["version"].id, {"temperature": 0.7}, np.float32(12.5), np.int64(9), np.int32(3), "stop")
    m = store.message(store.add_reply(chat["conv"], chat["user"], chat["q"], "x", reply))
    assert (m["latency_ms"], m["prompt_tokens"], m["completion_tokens"]) == (12.5, 9, 3)


def test_conversations_of_filters_by_source_in_sql(store):
    """50 Compare prompts no longer push the chats out of the chat history."""
    u = store.ensure_user("u")
    chats = [store.create_conversation(u, source="chat") for _ in range(3)]
    for _ in range(60):
        store.create_conversation(u, source="compare")
    assert all(c["source"] == "compare" for c in store.conversations_of(u))  # default: the 50 newest of any source
    assert len(store.conversations_of(u)) == 50
    assert [c["id"] for c in store.conversations_of(u, source="chat")] == chats[::-1]
    assert len(store.conversations_of(u, 10, source="compare")) == 10
    with pytest.raises(InvalidInputError, match="source"):
        store.conversations_of(u, source="nonsense")


def test_system_prompt_has_a_store_level_limit(tmp_path):
    with FeedbackStore(tmp_path / "f.db", StoreConfig(max_system_prompt_chars=100)) as small, \
            FeedbackStore(tmp_path / "g.db") as default:
        for s, limit in ((small, 100), (default, 4_000)):
            u = s.ensure_user("u")
            assert s.create_conversation(u, system_prompt="x" * limit)
            with pytest.raises(InvalidInputError, match=f"system prompt is {limit + 1:,} characters; the limit is"):
                s.create_conversation(u, system_prompt="x" * (limit + 1))
        assert default.db["conversations"].count == 1
        with pytest.raises(InvalidInputError, match="system prompt is 30,000 characters"):
            default.create_conversation("u", system_prompt="y" * 30_000)


def test_a_user_renames_exports_and_deletes_only_their_own_conversations(store, chat):
    alice, conv = chat["user"], chat["conv"]
    bob = store.ensure_user("bob")
    store.record_rating(alice, chat["replies"][1], 1, client_id="r1")
    store.rename_conversation(alice, conv, "  Arithmetic  ")
    assert store.owned_conversation(alice, conv)["title"] == "Arithmetic"
    exported = store.export_conversation(alice, conv)
    assert (exported["title"], exported["system_prompt"]) == ("Arithmetic", "Be brief.")
    assert [m["content"] for m in exported["messages"]] == ["What is 2+2?", "4", "Four.", "5"]
    assert [m.get("rating") for m in exported["messages"][1:]] == [None, 1, None]
    assert {m.get("model_version") for m in exported["messages"][1:]} == {chat["version"].name}
    json.dumps(exported)  # JSON-ready
    for call in (lambda: store.rename_conversation(bob, conv, "mine"), lambda: store.delete_conversation(bob, conv),
                 lambda: store.export_conversation(bob, conv)):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(InvalidInputError):
        store.rename_conversation(alice, conv, "   ")
    store.delete_conversation(alice, conv)
    assert store.conversations_of(alice) == []
    with pytest.raises(NotFoundError):
        store.export_conversation(alice, conv)
    # What it fed to training stays: the messages and the rating.
    assert store.db.execute("SELECT COUNT(*) FROM ratings WHERE message_id = ?", [chat["replies"][1]]).fetchone()[0] == 1
    assert len(store.conversation_messages(conv)) == 4


def test_sibling_replies_are_the_regenerations_of_one_turn(store, chat):
    replies = chat["replies"]
    assert store.sibling_replies(replies[2]) == replies
    follow_up = store.add_user_message(chat["conv"], chat["user"], "And 3+3?", parent_id=replies[0])
    answer = store.add_reply(chat["conv"], chat["user"], follow_up, "6", Reply(chat["version"].id, {}, 1.0, 9, 1, "stop"))
    assert store.sibling_replies(answer) == [answer]
    assert store.sibling_replies(follow_up) == []  # a user turn is no reply


@pytest.mark.parametrize("edge", [" ", "\u00a0", "\u2003", "\u3000", "\x1f", "\x0b", "\u2028", "\ufeff"])
def test_find_path_matches_a_reply_its_client_trimmed_of_any_whitespace(store, edge):
    """A stateless client sends back the reply it got, trimmed as its language trims (Python's str.strip,
    JavaScript's trim: every Unicode space): the history must still be found, so a follow-up extends it."""
    version = ModelRegistry(store).ensure_base_policy("tiny")
    alice = store.ensure_user("alice")
    conv = store.create_conversation(alice, system_prompt="Be brief.", source="api")
    q = store.add_user_message(conv, alice, "Hello there")
    text = f"{edge}Hi!{edge}"
    reply = store.add_reply(conv, alice, q, text, Reply(version.id, {"temperature": 0.7}, 1.0, 3, 3, "stop"))
    trimmed = text.strip() if edge != "\ufeff" else text.strip("\ufeff")  # JS trim() removes U+FEFF, str.strip() not
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": trimmed}]
    assert store.find_path(alice, history, system_prompt="Be brief.", source="api") == reply


def test_a_new_conversations_title_is_trimmed_as_a_rename_is(store) -> None:
    user = store.ensure_user("u")
    conv = store.create_conversation(user, title="\ufeff\u3000 Arithmetic\u00a0\n")
    assert store.owned_conversation(user, conv)["title"] == "Arithmetic"
    store.rename_conversation(user, conv, "\ufeff Sums \u2003")
    assert store.owned_conversation(user, conv)["title"] == "Sums"
