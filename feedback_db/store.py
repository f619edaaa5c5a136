"""FeedbackStore: the one door to the feedback database.

Everything the chat app records, and everything training reads, goes through here.
Every write is one transaction that either lands whole or not at all; bad input raises
a `FeedbackError` and writes nothing. Every feedback row carries an `event_id` from one
strictly increasing sequence, so "all events up to N" is a reproducible snapshot.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

from .connection import StoreConfig, WriteLock, connect, write_transaction
from .counting import UNVOTABLE_FINISH_REASONS, counted_comparisons, counted_totals, thumbs_by_version
from .errors import AccessDeniedError, InvalidInputError, NotFoundError
from .schema import current_version, migrate, utc_now
from .validation import clean_client_id, clean_id, clean_ids, clean_number, clean_tags, clean_text, sampling_json

Choice = Literal["A", "B", "tie", "both_bad"]
CHOICES: tuple[str, ...] = ("A", "B", "tie", "both_bad")
MIN_RANKED, MAX_RANKED = 2, 9
# What clients trim from a reply before sending it back: every character Python's str.strip() removes (all
# Unicode whitespace, the last at U+3000) and U+FEFF, which JavaScript's trim() also removes.
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace()) + "\ufeff"
SOURCES: tuple[str, ...] = ("chat", "compare", "rank", "import", "api")  # where a conversation came from
ROLE_ARTICLE = {"user": "a user", "assistant": "an assistant", "system": "a system"}  # for error messages



@dataclass
class Context:
    """What a reply answers: the system prompt and the turns from the root to a user message."""

    user_message_id: int
    system_prompt: str | None
    messages: list[dict[str, str]]  # [{"role": "user"|"assistant", "content": ...}, ...]
    prompt_format: str = "chat"  # "text" when it was imported as a plain-string prompt
    message_ids: list[int] = field(default_factory=list)  # ids of `messages`, root first

    def as_chat(self) -> list[dict[str, str]]:
        """The turns with the system prompt (if any) first, ready for a chat template."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages


@dataclass
class Reply:
    """Generation metadata stored with an assistant message."""

    model_version_id: int
    sampling: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class FeedbackStore:
    """A SQLite feedback database (WAL, foreign keys on, schema migrated on open).

    Safe to share between threads (one connection per thread) and processes (writers
    queue on a file lock). Example::

        store = FeedbackStore("feedback.db")
        user = store.ensure_user("alice")
        conv = store.create_conversation(user)
        q = store.add_user_message(conv, user, "Hi!")
        a = store.add_reply(conv, user, q, "Hello!", Reply(model_version_id=1))
        store.record_rating(user, a, +1, reasons=["friendly"])
    """

    def __init__(self, path: str | Path, config: StoreConfig | None = None, *, create: bool = True) -> None:
        self.path = Path(path)
        self.config = config or StoreConfig()
        if not create and not self.path.exists():
            raise NotFoundError(f"no feedback database at {self.path}; create one with `alignloop db init {self.path}`.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite_utils.Database] = []
        self._lock = WriteLock(self.path, timeout_s=self.config.lock_timeout_s)
        with self._lock.held():
            migrate(self.db)

    # -- plumbing ---------------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection (sqlite-utils `Database`): use it to read."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect(self.path, self.config)
            self._local.db = db
            self._connections.append(db)
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """An all-or-nothing write. Nested calls (e.g. an import calling record_*) join the
        outer transaction as savepoints, so the whole outer block lands or none of it does.

        Waits at most `config.lock_timeout_s` for the write lock, then raises StoreBusyError
        (nothing written): callers can tell the user to try again."""
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                with self.db.atomic() as db:
                    yield db
            finally:
                self._local.depth -= 1
            return
        self._local.depth = 1
        try:
            with write_transaction(self.db, self._lock) as db:
                yield db
        finally:
            self._local.depth = 0

    def let_writers_in(self, max_wait_s: float = 1.0) -> None:
        """Between the transactions of a long job (an import): let writers queued for the lock
        (in any process) go first, waiting at most `max_wait_s`. Inside a transaction (the lock
        held, so they could not go) it returns at once."""
        if not getattr(self._local, "depth", 0):
            self._lock.let_waiters_in(max_wait_s)

    def close(self) -> None:
        for db in self._connections:
            db.close()
        self._connections.clear()
        self._local = threading.local()
        self._lock.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return current_version(self.db)

    def snapshot(self) -> int:
        """The id of the latest event: exports `up to` it are reproducible forever."""
        row = self.db.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def _new_event(self, db: sqlite_utils.Database, table: str) -> int:
        return db["events"].insert({"table_name": table, "created_at": utc_now()}).last_pk

    @staticmethod
    def _already(db: sqlite_utils.Database, table: str, client_id: str | None) -> int | None:
        """The row an earlier submission with the same client id created, if any."""
        if client_id is None:
            return None
        row = db.execute(f"SELECT id FROM {table} WHERE client_id = ?", [client_id]).fetchone()
        return None if row is None else int(row[0])

    def _text(self, value: object, field: str, *, allow_empty: bool = False, max_chars: int | None = None) -> str:
        return clean_text(value, field=field, max_chars=max_chars or self.config.max_text_chars, allow_empty=allow_empty)

    @staticmethod
    def _user_id(user_id: object) -> str:
        """A user id as the store keeps it (short UTF-8 text); anything else is refused."""
        return clean_text(user_id, field="user id", max_chars=200)

    # -- users --------------------------------------------------------------------------
    def ensure_user(self, user_id: str | None = None, *, display_name: str | None = None, is_admin: bool = False) -> str:
        """Create the user if new (an anonymous id when `user_id` is None); return its id."""
        user_id = self._user_id(user_id if user_id is not None else f"anon-{uuid.uuid4().hex[:12]}")
        if display_name is not None:
            display_name = self._text(display_name, "display name", allow_empty=True, max_chars=200)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone() is None:
                db["users"].insert(
                    {"id": user_id, "display_name": display_name, "is_admin": int(is_admin), "created_at": utc_now()}
                )
            elif is_admin:
                db["users"].update(user_id, {"is_admin": 1})
        return user_id

    def _require_user(self, db: sqlite_utils.Database, user_id: str) -> None:
        if db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone() is None:
            raise NotFoundError(f"unknown user {user_id!r}; create it with ensure_user() first.")

    # -- conversations and messages ---------------------------------------------------
    def create_conversation(
        self,
        user_id: str,
        *,
        system_prompt: str | None = None,
        title: str | None = None,
        source: str = "chat",
        prompt_format: str = "chat",
        client_id: str | None = None,
    ) -> int:
        """Start a conversation owned by `user_id`; return its id."""
        user_id = self._user_id(user_id)
        client_id = clean_client_id(client_id)
        if system_prompt is not None:
            system_prompt = self._text(system_prompt, "system prompt", allow_empty=True,
                                       max_chars=self.config.max_system_prompt_chars) or None
        if title is not None:
            title = self._text(title, "title", allow_empty=True, max_chars=500).strip(WHITESPACE)  # as rename does
        if source not in SOURCES:
            raise InvalidInputError(f"source must be one of {', '.join(SOURCES)}, not {source!r:.40}.")
        if prompt_format not in ("chat", "text"):
            raise InvalidInputError(f"prompt_format must be 'chat' or 'text', not {prompt_format!r}.")
        with self.transaction() as db:
            if (existing := self._already(db, "conversations", client_id)) is not None:
                return existing
            self._require_user(db, user_id)
            return db["conversations"].insert(
                {
                    "user_id": user_id,
                    "title": title,
                    "system_prompt": system_prompt,
                    "source": source,
                    "prompt_format": prompt_format,
                    "created_at": utc_now(),
                    "client_id": client_id,
                }
            ).last_pk

    def _owned_conversation(self, db: sqlite_utils.Database, conversation_id: int, user_id: str) -> dict:
        rows = list(db.query("SELECT * FROM conversations WHERE id = ?", [conversation_id]))
        if not rows:
            raise NotFoundError(f"no conversation {conversation_id}; start one with create_conversation().")
        conv = rows[0]
        if conv["user_id"] != user_id:
            raise AccessDeniedError(f"conversation {conversation_id} belongs to another user.")
        return conv

    def _message(self, db: sqlite_utils.Database, message_id: int) -> dict:
        rows = list(db.query("SELECT * FROM messages WHERE id = ?", [message_id]))
        if not rows:
            raise NotFoundError(f"no message {message_id}; check the id (was the reply stored?).")
        return rows[0]

    def _add_message(self, conversation_id: int, user_id: str, role: str, content: str, parent_id: int | None,
                     reply: Reply | None, client_id: str | None, replace_unanswered: bool = False) -> int:
        user_id = self._user_id(user_id)
        conversation_id = clean_id(conversation_id, field="conversation")
        parent_id = None if parent_id is None else clean_id(parent_id, field="parent message")
        client_id = clean_client_id(client_id)
        content = self._text(content, f"{role} message", allow_empty=(role == "assistant"))
        generation = self._reply_columns(reply) if reply is not None else {}
        with self.transaction() as db:
            if (existing := self._already(db, "messages", client_id)) is not None:
                return existing
            self._owned_conversation(db, conversation_id, user_id)
            if parent_id is not None:
                parent = self._message(db, parent_id)
                if parent["conversation_id"] != conversation_id:
                    raise InvalidInputError(f"message {parent_id} is in another conversation; it cannot be the parent.")
                if replace_unanswered and role == parent["role"] == "user" and parent["user_id"] == user_id \
                        and db.execute("SELECT 1 FROM messages WHERE parent_id = ?", [parent_id]).fetchone() is None:
                    parent = None if parent["parent_id"] is None else self._message(db, parent["parent_id"])
                    parent_id = None if parent is None else parent["id"]
                expected = "assistant" if role == "user" else "user"
                if parent is not None and parent["role"] != expected:
                    raise InvalidInputError(f"{ROLE_ARTICLE[role]} message must follow {ROLE_ARTICLE[expected]} "
                                            f"message, not {ROLE_ARTICLE[parent['role']]} message.")
            elif role == "assistant":
                raise InvalidInputError("a reply needs the id of the user message it answers (parent_id).")
            row: dict[str, Any] = {
                "conversation_id": conversation_id,
                "parent_id": parent_id,
                "role": role,
                "content": content,
                "user_id": user_id,
                "created_at": utc_now(),
                "client_id": client_id,
            }
            if reply is not None:
                if db.execute("SELECT 1 FROM model_versions WHERE id = ?", [reply.model_version_id]).fetchone() is None:
                    raise NotFoundError(f"no model version {reply.model_version_id}; register it before storing its replies.")
                row.update(generation)
            row["event_id"] = self._new_event(db, "messages")
            return db["messages"].insert(row).last_pk

    @staticmethod
    def _reply_columns(reply: Reply) -> dict[str, Any]:
        """The generation metadata of a reply as columns, validated (valid JSON, finite numbers)."""
        if not isinstance(reply, Reply):
            raise InvalidInputError(f"reply metadata must be a Reply, not {type(reply).__name__}.")
        if isinstance(reply.model_version_id, bool) or not isinstance(reply.model_version_id, int):
            raise InvalidInputError(f"model_version_id must be an integer id, not {reply.model_version_id!r}.")
        finish_reason = reply.finish_reason
        if finish_reason is not None:
            finish_reason = clean_text(finish_reason, field="finish_reason", max_chars=50)
        return {
            "model_version_id": reply.model_version_id,
            "sampling": sampling_json(reply.sampling),
            "latency_ms": clean_number(reply.latency_ms, field="latency_ms"),
            "prompt_tokens": clean_number(reply.prompt_tokens, field="prompt_tokens", integer=True),
            "completion_tokens": clean_number(reply.completion_tokens, field="completion_tokens", integer=True),
            "finish_reason": finish_reason,
        }

    def add_user_message(self, conversation_id: int, user_id: str, content: str, *,
                         parent_id: int | None = None, client_id: str | None = None,
                         replace_unanswered: bool = False) -> int:
        """Store a user turn (after `parent_id`, an assistant reply, or at the root); return its id.

        ``replace_unanswered``: when `parent_id` is this user's own turn that has no reply (a server
        stopped while answering it), the new turn takes its place, as its sibling, instead of being
        refused as a user turn after a user turn. Checked and written in one transaction.
        """
        return self._add_message(conversation_id, user_id, "user", content, parent_id, None, client_id,
                                 replace_unanswered)

    def add_reply(self, conversation_id: int, user_id: str, parent_id: int, content: str, reply: Reply, *,
                  client_id: str | None = None) -> int:
        """Store an assistant reply to user message `parent_id`, tied to the model version that wrote it."""
        return self._add_message(conversation_id, user_id, "assistant", content, parent_id, reply, client_id)

    def message(self, message_id: int) -> dict:
        """One stored message (all its columns), or NotFoundError."""
        return self._message(self.db, clean_id(message_id, field="message"))

    def reply_by_client_id(self, user_id: str, client_id: str) -> int:
        """The id of `user_id`'s reply stored with `client_id` (e.g. the API's completion id), or NotFoundError."""
        user_id = self._user_id(user_id)
        client_id = clean_client_id(client_id)
        row = self.db.execute("SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                              "WHERE m.client_id = ? AND m.role = 'assistant' AND c.user_id = ?",
                              [client_id, user_id]).fetchone()
        if row is None:
            raise NotFoundError(f"no reply of yours with id {client_id!r:.60}; use the id of a completion you received.")
        return int(row[0])

    def context(self, message_id: int) -> Context:
        """The conversation from its root to `message_id` (inclusive)."""
        message_id = clean_id(message_id, field="message")
        rows = list(
            self.db.query(
                """
                WITH RECURSIVE path(id, parent_id, role, content, conversation_id, depth) AS (
                    SELECT id, parent_id, role, content, conversation_id, 0 FROM messages WHERE id = :id
                    UNION ALL
                    SELECT m.id, m.parent_id, m.role, m.content, m.conversation_id, p.depth + 1
                    FROM messages m JOIN path p ON m.id = p.parent_id
                )
                SELECT path.id, path.role, path.content, c.system_prompt, c.prompt_format
                FROM path JOIN conversations c ON c.id = path.conversation_id
                ORDER BY depth DESC
                """,
                {"id": message_id},
            )
        )
        if not rows:
            raise NotFoundError(f"no message {message_id}.")
        return Context(
            user_message_id=message_id,
            system_prompt=rows[0]["system_prompt"],
            messages=[{"role": r["role"], "content": r["content"]} for r in rows],
            prompt_format=rows[0]["prompt_format"],
            message_ids=[r["id"] for r in rows],
        )

    def latest_branch(self, conversation_id: int) -> Context | None:
        """The conversation along its most recent branch (root to newest message), or None if empty."""
        conversation_id = clean_id(conversation_id, field="conversation")
        row = self.db.execute("SELECT MAX(id) FROM messages WHERE conversation_id = ?", [conversation_id]).fetchone()
        return None if row[0] is None else self.context(int(row[0]))

    def conversation_messages(self, conversation_id: int) -> list[dict]:
        """Every message of a conversation (all branches), oldest first."""
        conversation_id = clean_id(conversation_id, field="conversation")
        return list(self.db.query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", [conversation_id]))

    def find_path(self, user_id: str, chat: list[dict[str, str]], *, system_prompt: str | None = None,
                  source: str = "api", candidates: int = 20) -> int | None:
        """The id of the user's newest message whose path from its conversation's root is exactly `chat`
        (role and content of every turn, leading and trailing whitespace aside: clients trim replies),
        in a conversation of `source` with this system prompt; None if
        there is none. A stateless client (the OpenAI API) sends the whole history with every request:
        this finds where in the stored tree that history ends, so a follow-up extends the conversation
        and a regenerated reply becomes a sibling of the earlier ones. Only the `candidates` newest
        messages with the last turn's text are checked."""
        user_id = self._user_id(user_id)
        if not chat or not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in chat):
            raise InvalidInputError("chat must be a non-empty list of {'role', 'content'} turns.")
        if source not in SOURCES:
            raise InvalidInputError(f"source must be one of {', '.join(SOURCES)}, not {source!r:.40}.")
        def turns(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
            return [(t["role"], t["content"].strip(WHITESPACE)) for t in messages]

        wanted = turns(chat)
        rows = self.db.execute(
            "SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.user_id = ? AND c.source = ? AND m.role = ? AND TRIM(m.content, ?) = ? ORDER BY m.id DESC LIMIT ?",
            [user_id, source, wanted[-1][0], WHITESPACE, wanted[-1][1], candidates]).fetchall()
        for (message_id,) in rows:
            ctx = self.context(message_id)
            if (ctx.system_prompt or None) == (system_prompt or None) and turns(ctx.messages) == wanted:
                return message_id
        return None

    def conversations_of(self, user_id: str, limit: int = 50, *, source: str | None = None) -> list[dict]:
        """A user's conversations, newest first: the `limit` newest of `source` (chat, compare, rank
        or import; None: of any source), leaving out those the user deleted. The chat history asks for
        source="chat", so Compare and Rank prompts do not push chats out of it."""
        user_id = self._user_id(user_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 2**63:
            raise InvalidInputError(f"limit must be a non-negative integer, not {limit!r}.")
        if source is None:
            return list(self.db.query(
                "SELECT * FROM conversations WHERE user_id = ? AND deleted_at IS NULL ORDER BY id DESC LIMIT ?",
                [user_id, limit]))
        if source not in SOURCES:
            raise InvalidInputError(f"source must be {', '.join(SOURCES)} or None, not {source!r}.")
        return list(self.db.query(
            "SELECT * FROM conversations WHERE user_id = ? AND source = ? AND deleted_at IS NULL "
            "ORDER BY id DESC LIMIT ?", [user_id, source, limit]))

    def owned_conversation(self, user_id: str, conversation_id: int) -> dict:
        """The row of a conversation `user_id` owns and has not deleted, else NotFoundError (also for
        another user's conversation: whether it exists is not the caller's business)."""
        user_id = self._user_id(user_id)
        conversation_id = clean_id(conversation_id, field="conversation")
        rows = list(self.db.query("SELECT * FROM conversations WHERE id = ? AND user_id = ? AND deleted_at IS NULL",
                                  [conversation_id, user_id]))
        if not rows:
            raise NotFoundError(f"no conversation {conversation_id} of yours; it was deleted or never existed.")
        return rows[0]

    def rename_conversation(self, user_id: str, conversation_id: int, title: str) -> None:
        """Give a conversation of `user_id` a new title (1 to 200 characters)."""
        title = self._text(title, "title", max_chars=200).strip(WHITESPACE)
        if not title:
            raise InvalidInputError("a title needs at least one visible character.")
        with self.transaction() as db:
            self.owned_conversation(user_id, conversation_id)
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", [title, conversation_id])

    def delete_conversation(self, user_id: str, conversation_id: int) -> None:
        """Delete a conversation from `user_id`'s history: it is no longer listed, opened or exported for
        them. Its messages, and the feedback given on them, stay for training (exports refer to them)."""
        with self.transaction() as db:
            self.owned_conversation(user_id, conversation_id)
            db.execute("UPDATE conversations SET deleted_at = ? WHERE id = ?", [utc_now(), conversation_id])

    def export_conversation(self, user_id: str, conversation_id: int) -> dict[str, Any]:
        """A conversation of `user_id` as a JSON-ready dict: every message of every branch (the tree by
        parent_id), each reply with the model version that wrote it, and the user's latest rating of it."""
        conv = self.owned_conversation(user_id, conversation_id)
        rows = self.db.query(
            """
            SELECT m.id, m.parent_id, m.role, m.content, m.created_at, m.finish_reason, m.sampling,
                   m.completion_tokens, mv.name AS model_version,
                   (SELECT r.value FROM ratings r WHERE r.message_id = m.id AND r.user_id = :user
                    ORDER BY r.event_id DESC LIMIT 1) AS rating
            FROM messages m LEFT JOIN model_versions mv ON mv.id = m.model_version_id
            WHERE m.conversation_id = :conv ORDER BY m.id
            """, {"conv": conv["id"], "user": conv["user_id"]})
        messages = []
        for r in rows:
            item = {k: r[k] for k in ("id", "parent_id", "role", "content", "created_at")}
            if r["role"] == "assistant":
                item.update(model_version=r["model_version"], finish_reason=r["finish_reason"],
                            completion_tokens=r["completion_tokens"], rating=r["rating"],
                            sampling=json.loads(r["sampling"]) if r["sampling"] else None)
            messages.append(item)
        return {"id": conv["id"], "title": conv["title"], "created_at": conv["created_at"],
                "system_prompt": conv["system_prompt"], "source": conv["source"], "messages": messages}

    def ratings_by(self, user_id: str, message_ids: list[int]) -> dict[int, int]:
        """{message id: the user's latest rating of it (1, -1, or 0 for a rating taken back)} for those of
        `message_ids` the user rated: what their 👍/👎 show."""
        user_id = self._user_id(user_id)
        ids = clean_ids(message_ids, field="message")
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT message_id, value FROM ratings WHERE user_id = ? AND message_id IN ({marks}) ORDER BY event_id",
            [user_id, *ids]).fetchall()
        return {int(message_id): int(value) for message_id, value in rows}  # the latest rating wins

    def sibling_replies(self, reply_id: int) -> list[int]:
        """The replies to the same user message as `reply_id` (regenerations), oldest first, itself included."""
        reply_id = clean_id(reply_id, field="reply")
        return [r[0] for r in self.db.execute(
            "SELECT s.id FROM messages m JOIN messages s ON s.parent_id = m.parent_id AND s.role = 'assistant' "
            "WHERE m.id = ? AND m.role = 'assistant' ORDER BY s.id", [reply_id]).fetchall()]

    # -- feedback ---------------------------------------------------------------------
    def _owned_reply(self, db: sqlite_utils.Database, message_id: int, user_id: str) -> dict:
        msg = self._message(db, message_id)
        if msg["role"] != "assistant":
            raise InvalidInputError(f"message {message_id} is a user turn; feedback applies to assistant replies.")
        self._owned_conversation(db, msg["conversation_id"], user_id)
        return msg

    def _votable_reply(self, db: sqlite_utils.Database, message_id: int, user_id: str) -> dict:
        """The user's reply, if it may be voted on: not failed, not stopped (UNVOTABLE_FINISH_REASONS)."""
        msg = self._owned_reply(db, message_id, user_id)
        if msg["finish_reason"] in UNVOTABLE_FINISH_REASONS:
            why = {"error": "failed (the model could not answer)", "abort": "was stopped before it finished"}
            raise InvalidInputError(
                f"reply {message_id} {why.get(msg['finish_reason'], 'did not finish')}, so it cannot be rated, "
                "compared or ranked; regenerate it and vote on the new reply.")
        return msg

    def record_rating(self, user_id: str, message_id: int, value: int, *, reasons: list[str] | None = None,
                      comment: str | None = None, client_id: str | None = None) -> int:
        """Thumbs up (+1), down (-1) or cleared (0) on a reply, with optional reason tags and comment.

        A user's latest rating of a reply is the one that counts; earlier ones stay as history.
        A failed or stopped reply cannot be rated (see UNVOTABLE_FINISH_REASONS).
        """
        user_id = self._user_id(user_id)
        message_id = clean_id(message_id, field="message")
        client_id = clean_client_id(client_id)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value not in (-1, 0, 1):
            raise InvalidInputError(f"a rating is +1 (thumbs up), -1 (thumbs down) or 0 (cleared), not {value!r:.40}.")
        value = int(value)
        tags = clean_tags(reasons)
        if comment is not None:
            comment = self._text(comment, "comment", allow_empty=True, max_chars=self.config.max_comment_chars) or None
        with self.transaction() as db:
            if (existing := self._already(db, "ratings", client_id)) is not None:
                return existing
            self._votable_reply(db, message_id, user_id)
            return db["ratings"].insert(
                {
                    "message_id": message_id,
                    "user_id": user_id,
                    "value": value,
                    "reasons": json.dumps(tags),
                    "comment": comment,
                    "created_at": utc_now(),
                    "event_id": self._new_event(db, "ratings"),
                    "client_id": client_id,
                }
            ).last_pk

    def _sibling_replies(self, db: sqlite_utils.Database, user_id: str, message_ids: list[int]) -> int:
        """Check that the replies exist, are the user's, may be voted on and answer the same context; return it."""
        contexts = {self._votable_reply(db, m, user_id)["parent_id"] for m in message_ids}
        if len(contexts) != 1:
            raise InvalidInputError(
                f"replies {message_ids} answer different contexts; compare or rank only replies to the same message."
            )
        return contexts.pop()

    def record_comparison(self, user_id: str, message_a: int, message_b: int, choice: Choice, *,
                          client_id: str | None = None) -> int:
        """A pairwise vote between two replies to the same context: 'A', 'B', 'tie' or 'both_bad'.

        Neither reply may have failed or been stopped (see UNVOTABLE_FINISH_REASONS).
        """
        user_id = self._user_id(user_id)
        message_a, message_b = clean_id(message_a, field="message_a"), clean_id(message_b, field="message_b")
        client_id = clean_client_id(client_id)
        if not isinstance(choice, str) or choice not in CHOICES:
            raise InvalidInputError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r:.40}.")
        if message_a == message_b:
            raise InvalidInputError("a comparison needs two different replies.")
        with self.transaction() as db:
            if (existing := self._already(db, "comparisons", client_id)) is not None:
                return existing
            user_message_id = self._sibling_replies(db, user_id, [message_a, message_b])
            return db["comparisons"].insert(
                {
                    "user_id": user_id,
                    "user_message_id": user_message_id,
                    "message_a": message_a,
                    "message_b": message_b,
                    "choice": choice,
                    "created_at": utc_now(),
                    "event_id": self._new_event(db, "comparisons"),
                    "client_id": client_id,
                }
            ).last_pk

    def record_ranking(self, user_id: str, ranked_message_ids: list[int], *, client_id: str | None = None) -> int:
        """K replies to one context ordered best first (K = 2..9), stored as one ranking.

        No ranked reply may have failed or been stopped (see UNVOTABLE_FINISH_REASONS).
        """
        user_id = self._user_id(user_id)
        client_id = clean_client_id(client_id)
        ids = clean_ids(ranked_message_ids, field="ranked reply")
        if not MIN_RANKED <= len(ids) <= MAX_RANKED:
            raise InvalidInputError(f"a ranking orders {MIN_RANKED} to {MAX_RANKED} replies, got {len(ids)}.")
        if len(set(ids)) != len(ids):
            raise InvalidInputError("a ranking lists each reply once; remove the duplicates.")
        with self.transaction() as db:
            if (existing := self._already(db, "rankings", client_id)) is not None:
                return existing
            user_message_id = self._sibling_replies(db, user_id, ids)
            ranking_id = db["rankings"].insert(
                {
                    "user_id": user_id,
                    "user_message_id": user_message_id,
                    "k": len(ids),
                    "created_at": utc_now(),
                    "event_id": self._new_event(db, "rankings"),
                    "client_id": client_id,
                }
            ).last_pk
            db["ranking_items"].insert_all(
                {"ranking_id": ranking_id, "position": i, "message_id": m} for i, m in enumerate(ids)
            )
            return ranking_id

    def record_demonstration(self, user_id: str, user_message_id: int, content: str, *,
                             replaces_message_id: int | None = None, client_id: str | None = None) -> int:
        """A user-written ideal reply to user message `user_message_id`.

        `replaces_message_id` names the model reply (to the same message) it improves on; the
        preference export then pairs the demonstration (chosen) with that reply (rejected). A
        failed or stopped reply may be replaced (that is when a better reply helps most); the
        demonstration still trains SFT, while the pair is skipped by the export.
        """
        user_id = self._user_id(user_id)
        user_message_id = clean_id(user_message_id, field="user message")
        if replaces_message_id is not None:
            replaces_message_id = clean_id(replaces_message_id, field="replaced reply")
        client_id = clean_client_id(client_id)
        content = self._text(content, "demonstration")
        with self.transaction() as db:
            if (existing := self._already(db, "demonstrations", client_id)) is not None:
                return existing
            ctx = self._message(db, user_message_id)
            if ctx["role"] != "user":
                raise InvalidInputError(f"message {user_message_id} is a reply; a demonstration answers a user message.")
            self._owned_conversation(db, ctx["conversation_id"], user_id)
            if replaces_message_id is not None:
                replaced = self._owned_reply(db, replaces_message_id, user_id)
                if replaced["parent_id"] != user_message_id:
                    raise InvalidInputError(f"reply {replaces_message_id} does not answer message {user_message_id}.")
            return db["demonstrations"].insert(
                {
                    "user_id": user_id,
                    "user_message_id": user_message_id,
                    "content": content,
                    "replaces_message_id": replaces_message_id,
                    "created_at": utc_now(),
                    "event_id": self._new_event(db, "demonstrations"),
                    "client_id": client_id,
                }
            ).last_pk

    # -- reading ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Row counts, what counts of the feedback (`counted`: each user's latest rating per reply,
        latest vote per pair, ..., see counting.py), thumbs per model version (the same rule), the
        live versions and the current snapshot id."""
        db = self.db
        tables = ["users", "conversations", "messages", "ratings", "comparisons", "rankings",
                  "demonstrations", "model_versions", "training_rounds"]
        counts = {t: db[t].count for t in tables}
        return {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "snapshot": self.snapshot(),
            "counts": counts,
            "counted": counted_totals(db),
            "thumbs_by_version": thumbs_by_version(db),
            "comparison_choices": dict(Counter(c["choice"] for c in counted_comparisons(db))),
            "live": {
                r["kind"]: r["name"] for r in db.query("SELECT kind, name FROM model_versions WHERE status = 'live'")
            },
        }
