"""The database schema as a list of forward migrations.

Each migration is a function of a `sqlite_utils.Database`, applied once, in order,
inside one transaction, and recorded in `schema_migrations`. Never edit a released
migration: add a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import sqlite_utils

from .errors import SchemaVersionError


def utc_now() -> str:
    """Timestamps are ISO-8601 UTC strings: sortable and readable in any SQLite browser."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _initial(db: sqlite_utils.Database) -> None:
    """Migration 1: every table of the feedback store and the model registry."""
    # AUTOINCREMENT keeps event ids strictly increasing and never reused, so a snapshot
    # "every event with id <= N" names the same set of feedback forever.
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, table_name TEXT NOT NULL,"
        " created_at TEXT NOT NULL)"
    )
    db["users"].create(
        {"id": str, "display_name": str, "is_admin": int, "created_at": str},
        pk="id",
        not_null={"created_at"},
        defaults={"is_admin": 0},
    )
    db["sessions"].create(
        {"id": str, "user_id": str, "user_agent": str, "created_at": str},
        pk="id",
        foreign_keys=[("user_id", "users", "id")],
        not_null={"user_id", "created_at"},
    )
    db["training_rounds"].create(
        {
            "id": int,
            "status": str,  # running | succeeded | failed | stopped
            "config": str,  # JSON
            "snapshot_event_id": int,
            "started_at": str,
            "finished_at": str,
            "metrics": str,  # JSON
            "report_path": str,
        },
        pk="id",
        not_null={"status", "started_at"},
    )
    db["model_versions"].create(
        {
            "id": int,
            "name": str,  # unique and never reused: it is the LoRA name the engines serve
            "kind": str,  # policy | reward | external
            "adapter_path": str,  # NULL: the bare base model
            "base_model": str,
            "parent_id": int,
            "round_id": int,
            "status": str,  # candidate | live | retired
            "metrics": str,  # JSON
            "created_at": str,
            "promoted_at": str,
        },
        pk="id",
        foreign_keys=[("parent_id", "model_versions", "id"), ("round_id", "training_rounds", "id")],
        not_null={"name", "kind", "status", "created_at"},
    )
    db["model_versions"].create_index(["name"], unique=True)
    db["model_versions"].create_index(["kind", "status"])
    db["registry_log"].create(
        {
            "id": int,
            "kind": str,
            "action": str,  # register | promote | rollback | retire
            "version_id": int,
            "previous_version_id": int,
            "actor": str,
            "at": str,
        },
        pk="id",
        foreign_keys=[("version_id", "model_versions", "id"), ("previous_version_id", "model_versions", "id")],
        not_null={"kind", "action", "at"},
    )
    db["conversations"].create(
        {
            "id": int,
            "user_id": str,
            "session_id": str,
            "title": str,
            "system_prompt": str,
            "source": str,  # chat | compare | rank | import
            "prompt_format": str,  # chat: message lists; text: imported as a plain string prompt
            "created_at": str,
            "client_id": str,
        },
        pk="id",
        foreign_keys=[("user_id", "users", "id"), ("session_id", "sessions", "id")],
        not_null={"user_id", "source", "prompt_format", "created_at"},
    )
    db["conversations"].create_index(["client_id"], unique=True)
    db["conversations"].create_index(["user_id"])
    db["messages"].create(
        {
            "id": int,
            "conversation_id": int,
            "parent_id": int,  # a tree: regenerations and alternatives are siblings
            "role": str,  # user | assistant
            "content": str,
            "user_id": str,
            "model_version_id": int,  # set for every assistant message
            "sampling": str,  # JSON: temperature, top_p, max_tokens, seed, ...
            "latency_ms": float,
            "prompt_tokens": int,
            "completion_tokens": int,
            "finish_reason": str,
            "created_at": str,
            "event_id": int,
            "client_id": str,
        },
        pk="id",
        foreign_keys=[
            ("conversation_id", "conversations", "id"),
            ("parent_id", "messages", "id"),
            ("user_id", "users", "id"),
            ("model_version_id", "model_versions", "id"),
            ("event_id", "events", "id"),
        ],
        not_null={"conversation_id", "role", "content", "user_id", "created_at", "event_id"},
    )
    db["messages"].create_index(["client_id"], unique=True)
    db["messages"].create_index(["conversation_id"])
    db["messages"].create_index(["parent_id"])
    db["messages"].create_index(["model_version_id"])
    db["ratings"].create(
        {
            "id": int,
            "message_id": int,
            "user_id": str,
            "value": int,  # +1 thumbs up, -1 thumbs down, 0 cleared
            "reasons": str,  # JSON list of tags
            "comment": str,
            "created_at": str,
            "event_id": int,
            "client_id": str,
        },
        pk="id",
        foreign_keys=[("message_id", "messages", "id"), ("user_id", "users", "id"), ("event_id", "events", "id")],
        not_null={"message_id", "user_id", "value", "created_at", "event_id"},
    )
    db["ratings"].create_index(["client_id"], unique=True)
    db["ratings"].create_index(["message_id"])
    db["comparisons"].create(
        {
            "id": int,
            "user_id": str,
            "context_id": int,  # the user message both replies answer
            "message_a": int,
            "message_b": int,
            "choice": str,  # A | B | tie | both_bad
            "created_at": str,
            "event_id": int,
            "client_id": str,
        },
        pk="id",
        foreign_keys=[
            ("user_id", "users", "id"),
            ("context_id", "messages", "id"),
            ("message_a", "messages", "id"),
            ("message_b", "messages", "id"),
            ("event_id", "events", "id"),
        ],
        not_null={"user_id", "context_id", "message_a", "message_b", "choice", "created_at", "event_id"},
    )
    db["comparisons"].create_index(["client_id"], unique=True)
    db["comparisons"].create_index(["context_id"])
    db["rankings"].create(
        {"id": int, "user_id": str, "context_id": int, "k": int, "created_at": str, "event_id": int, "client_id": str},
        pk="id",
        foreign_keys=[("user_id", "users", "id"), ("context_id", "messages", "id"), ("event_id", "events", "id")],
        not_null={"user_id", "context_id", "k", "created_at", "event_id"},
    )
    db["rankings"].create_index(["client_id"], unique=True)
    db["rankings"].create_index(["context_id"])
    db["ranking_items"].create(
        {"ranking_id": int, "position": int, "message_id": int},  # position 0 = best
        pk=("ranking_id", "position"),
        foreign_keys=[("ranking_id", "rankings", "id"), ("message_id", "messages", "id")],
        not_null={"message_id"},
    )
    db["demonstrations"].create(
        {
            "id": int,
            "user_id": str,
            "context_id": int,  # the user message the ideal reply answers
            "content": str,
            "replaces_message_id": int,  # the model reply it improves on, if any
            "created_at": str,
            "event_id": int,
            "client_id": str,
        },
        pk="id",
        foreign_keys=[
            ("user_id", "users", "id"),
            ("context_id", "messages", "id"),
            ("replaces_message_id", "messages", "id"),
            ("event_id", "events", "id"),
        ],
        not_null={"user_id", "context_id", "content", "created_at", "event_id"},
    )
    db["demonstrations"].create_index(["client_id"], unique=True)
    db["demonstrations"].create_index(["context_id"])


def _browsing_views(db: sqlite_utils.Database) -> None:
    """Migration 2: views that make the database readable in datasette / sqlite-utils."""
    db.create_view(
        "reply_scores",
        """
        SELECT m.id AS message_id, m.conversation_id, m.parent_id AS context_id,
               mv.name AS model_version, COALESCE(SUM(r.value), 0) AS score,
               COUNT(r.id) AS n_ratings
        FROM messages m
        LEFT JOIN model_versions mv ON mv.id = m.model_version_id
        LEFT JOIN ratings r ON r.message_id = m.id
        WHERE m.role = 'assistant'
        GROUP BY m.id
        """,
    )
    db.create_view(
        "thumbs_by_version",
        """
        SELECT mv.id AS model_version_id, mv.name AS model_version, mv.status,
               SUM(r.value = 1) AS thumbs_up, SUM(r.value = -1) AS thumbs_down,
               ROUND(1.0 * SUM(r.value = 1) / NULLIF(SUM(r.value != 0), 0), 4) AS up_rate
        FROM ratings r
        JOIN messages m ON m.id = r.message_id
        JOIN model_versions mv ON mv.id = m.model_version_id
        GROUP BY mv.id
        """,
    )
    db["ratings"].create_index(["user_id", "message_id"])


def _latest_reply_scores_view(db: sqlite_utils.Database, user_message_column: str) -> None:
    """`reply_scores` over each user's latest rating (migration 3; migration 6 renames its column)."""
    db.create_view(
        "reply_scores",
        f"""
        SELECT m.id AS message_id, m.conversation_id, m.parent_id AS {user_message_column},
               mv.name AS model_version, COALESCE(SUM(l.value), 0) AS score,
               COUNT(l.id) AS n_ratings
        FROM messages m
        LEFT JOIN model_versions mv ON mv.id = m.model_version_id
        LEFT JOIN latest_ratings l ON l.message_id = m.id AND l.value != 0
        WHERE m.role = 'assistant'
        GROUP BY m.id
        """,
        replace=True,
    )


def _latest_rating_views(db: sqlite_utils.Database) -> None:
    """Migration 3: the browsing views count each user's latest rating of a reply (counting.py's
    rule, as of this migration): 👍 then "Save feedback" is one thumbs-up, a changed vote counts
    once, a latest 0 removes the rating, and failed or stopped replies count nowhere."""
    db.create_view(
        "latest_ratings",
        """
        SELECT r.* FROM ratings r
        WHERE r.event_id = (SELECT MAX(r2.event_id) FROM ratings r2
                            WHERE r2.user_id = r.user_id AND r2.message_id = r.message_id)
        """,
    )
    _latest_reply_scores_view(db, "context_id")
    db.create_view(
        "thumbs_by_version",
        """
        SELECT mv.id AS model_version_id, mv.name AS model_version, mv.status,
               SUM(l.value = 1) AS thumbs_up, SUM(l.value = -1) AS thumbs_down,
               ROUND(1.0 * SUM(l.value = 1) / COUNT(*), 4) AS up_rate
        FROM latest_ratings l
        JOIN messages m ON m.id = l.message_id
        JOIN model_versions mv ON mv.id = m.model_version_id
        WHERE l.value != 0 AND COALESCE(m.finish_reason, '') NOT IN ('error', 'abort')
        GROUP BY mv.id
        """,
        replace=True,
    )


def _one_live_version_per_kind(db: sqlite_utils.Database) -> None:
    """Migration 4: a partial unique index allows at most one live version per kind.

    A database that raced into two live versions of a kind keeps the one promoted last (then
    the newest) live; the others are retired, each with a `retire` entry by 'migration 4'.
    """
    now = utc_now()
    for (kind,) in db.execute(
        "SELECT kind FROM model_versions WHERE status = 'live' GROUP BY kind HAVING COUNT(*) > 1"
    ).fetchall():
        live = db.execute(
            "SELECT id FROM model_versions WHERE kind = ? AND status = 'live'"
            " ORDER BY COALESCE(promoted_at, '') DESC, id DESC", [kind]
        ).fetchall()
        for (version_id,) in live[1:]:
            db.execute("UPDATE model_versions SET status = 'retired' WHERE id = ?", [version_id])
            db.execute(
                "INSERT INTO registry_log (kind, action, version_id, previous_version_id, actor, at)"
                " VALUES (?, 'retire', ?, NULL, 'migration 4', ?)", [kind, version_id, now]
            )
    db.execute("CREATE UNIQUE INDEX one_live_version_per_kind ON model_versions (kind) WHERE status = 'live'")


def _deletable_conversations(db: sqlite_utils.Database) -> None:
    """Migration 5: a user can delete a conversation from their history (`deleted_at`); its messages and
    the feedback given on them stay, because exports and past rounds refer to them."""
    db["conversations"].add_column("deleted_at", str)


def _user_message_id(db: sqlite_utils.Database) -> None:
    """Migration 6: comparisons, rankings and demonstrations name the user message they answer
    `user_message_id` (it was `context_id`), and so does the `reply_scores` view; the indexes follow.

    SQLite's RENAME COLUMN rewrites the foreign keys and index columns; the indexes are renamed
    too, so their names still say what they index.
    """
    for table in ("comparisons", "rankings", "demonstrations"):
        db.execute(f"ALTER TABLE {table} RENAME COLUMN context_id TO user_message_id")
        db.execute(f"DROP INDEX IF EXISTS idx_{table}_context_id")
        db[table].create_index(["user_message_id"])
    _latest_reply_scores_view(db, "user_message_id")


def _no_sessions_table(db: sqlite_utils.Database) -> None:
    """Migration 7: the `sessions` table and `conversations.session_id` go. No part of the app
    wrote them: who a user is comes from the login or the server-signed identity
    (chat_app/identity.py), never from a browser session id.

    sqlite-utils' transform rebuilds the table with its indexes; inside this migration's
    transaction it defers the foreign-key checks to the commit.
    """
    users = [name for name, sql in db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type IN ('view', 'trigger') AND (sql LIKE '%sessions%' "
        "OR sql LIKE '%session_id%')").fetchall()]
    if users:
        raise SchemaVersionError(
            f"this database's own views or triggers ({', '.join(users)}) use the `sessions` table or "
            "`conversations.session_id`, which schema version 7 removes (alignloop never wrote them); "
            "drop or rewrite them, then open the database again.")
    db["conversations"].transform(drop={"session_id"}, drop_foreign_keys=["session_id"])
    db["sessions"].drop()


MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "initial schema", _initial),
    (2, "browsing views", _browsing_views),
    (3, "views count each user's latest rating", _latest_rating_views),
    (4, "one live version per kind", _one_live_version_per_kind),
    (5, "conversations can be deleted from a user's history", _deletable_conversations),
    (6, "feedback names the user message it answers (user_message_id)", _user_message_id),
    (7, "no sessions table: identities come from the login or the signed token", _no_sessions_table),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def current_version(db: sqlite_utils.Database) -> int:
    """The highest applied migration, 0 for an empty database."""
    if "schema_migrations" not in db.table_names():
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(db: sqlite_utils.Database, target: int | None = None) -> list[int]:
    """Apply pending migrations up to `target` (default: latest); return those applied.

    The caller must hold the write lock. Each migration runs in its own transaction,
    so an interruption leaves the database at the last complete version.
    """
    target = LATEST_VERSION if target is None else target
    have = current_version(db)
    if have > LATEST_VERSION:
        raise SchemaVersionError(
            f"this database is at schema version {have}, newer than this alignloop knows "
            f"({LATEST_VERSION}); upgrade alignloop (pip install -U alignloop)."
        )
    applied = []
    for version, name, apply in MIGRATIONS:
        if version <= have or version > target:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if "schema_migrations" not in db.table_names():
                db["schema_migrations"].create(
                    {"version": int, "name": str, "applied_at": str}, pk="version"
                )
            apply(db)
            db["schema_migrations"].insert({"version": version, "name": name, "applied_at": utc_now()})
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
        applied.append(version)
    return applied
