"""Seeding the store from JSONL in TRL's conventions (e.g. a public preference set).

The same formats the exports write come back in: preferences (`prompt`/`chosen`/
`rejected`, strings or conversational lists; `chosen_ended`/`rejected_ended` false for a reply
cut off at a token limit), SFT (`messages`, or `prompt`/`completion`)
and prompts (`prompt`). Every row is validated before anything is written (a preference
row the export would never produce, with an empty `chosen` or `rejected` or the same text
in both, is refused with its row number), so a bad file writes nothing. The rows then land
in transactions of `StoreConfig.import_batch_rows`, and writers queued for the lock go
between two of them: an import never holds the database for longer than one batch. Client
ids derived from the content make a repeated import of the same file a no-op, so an
interrupted import (whole batches landed) is completed by running it again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInputError
from .registry import ModelRegistry
from .store import FeedbackStore, Reply
from .validation import clean_text

IMPORT_USER = "importer"


@dataclass
class ImportResult:
    """How many rows a file had, and how many records were new."""

    rows: int
    new_records: int
    source: str


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a `.jsonl` or `.jsonl.gz` file; a bad line (not UTF-8, not JSON, a lone
    surrogate such as "\\ud800") raises InvalidInputError with its number."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"{path}:{n} is not valid UTF-8 (byte {exc.start}); save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{n} is not valid JSON ({exc.msg}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise InvalidInputError(f"{path}:{n} is not a JSON object.")
            _check_encodable(row, f"{path}:{n}")
            yield row


def _check_encodable(row: dict[str, Any], where: str) -> None:
    """Refuse a row holding a lone surrogate (JSON allows the escape "\\ud800"; UTF-8 and SQLite do not)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where} contains an unpaired surrogate escape (such as \"\\ud800\"), which is not valid text; "
            f"fix or remove that line (position {exc.start} of the row)."
        ) from None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def _turns(value: Any, where: str, *, max_chars: int,
           max_system_chars: int | None = None) -> tuple[str | None, list[dict[str, str]], str]:
    """(system prompt, turns, format) of a TRL prompt: a string or a list of messages."""
    if isinstance(value, str):
        return None, [{"role": "user", "content": clean_text(value, field=f"{where} prompt", max_chars=max_chars)}], "text"
    if not isinstance(value, list) or not value:
        raise InvalidInputError(f"{where}: 'prompt' must be a string or a non-empty list of messages.")
    system = None
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise InvalidInputError(f"{where}: message {i} needs a role (system/user/assistant) and content.")
        limit = max_system_chars if m["role"] == "system" and max_system_chars else max_chars
        content = clean_text(m["content"], field=f"{where} message {i}", max_chars=limit,
                             allow_empty=m["role"] != "user")
        if m["role"] == "system":
            if i != 0:
                raise InvalidInputError(f"{where}: a system message may only come first.")
            system = content
        else:
            turns.append({"role": m["role"], "content": content})
    expected = "user"
    for i, t in enumerate(turns):
        if t["role"] != expected:
            raise InvalidInputError(f"{where}: turns must alternate user/assistant starting with user (turn {i}).")
        expected = "assistant" if expected == "user" else "user"
    if not turns or turns[-1]["role"] != "user":
        raise InvalidInputError(f"{where}: the prompt must end with a user turn.")
    return system, turns, "chat"


def _completion(value: Any, where: str, field: str, fmt: str, *, max_chars: int) -> str:
    if fmt == "text":
        if not isinstance(value, str):
            raise InvalidInputError(f"{where}: with a string prompt, '{field}' must be a string too.")
        return clean_text(value, field=f"{where} {field}", max_chars=max_chars, allow_empty=True)
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and "content" in value[0]):
        raise InvalidInputError(f"{where}: '{field}' must be [{{'role': 'assistant', 'content': ...}}].")
    return clean_text(value[0]["content"], field=f"{where} {field}", max_chars=max_chars, allow_empty=True)


class _Importer:
    """Creates contexts and replies with content-derived client ids (so re-imports are no-ops)."""

    def __init__(self, store: FeedbackStore, source: str) -> None:
        self.store = store
        self.source = source
        self.user = store.ensure_user(IMPORT_USER, display_name="imported data")
        self.version = ModelRegistry(store).ensure_version(f"external:{source}", kind="external")

    def context(self, system: str | None, turns: list[dict[str, str]], fmt: str) -> int:
        """The id of the last user message of this context, created if new."""
        key = f"import:{self.source}:ctx:{_digest([system, turns])}"
        conv = self.store.create_conversation(
            self.user, system_prompt=system, source="import", prompt_format=fmt, client_id=key
        )
        parent = None
        for i, t in enumerate(turns):
            if t["role"] == "user":
                parent = self.store.add_user_message(conv, self.user, t["content"], parent_id=parent,
                                                     client_id=f"{key}:turn:{i}")
            else:
                parent = self.store.add_reply(conv, self.user, parent, t["content"], Reply(self.version.id),
                                              client_id=f"{key}:turn:{i}")
        return parent

    def reply(self, user_message_id: int, text: str, ended: bool = True) -> int:
        """A reply; `ended` False stores it as one the server cut off at its token limit."""
        conv = self.store.message(user_message_id)["conversation_id"]
        return self.store.add_reply(conv, self.user, user_message_id, text,
                                    Reply(self.version.id, finish_reason=None if ended else "length"),
                                    client_id=f"import:{self.source}:reply:{user_message_id}:{_digest(text)}")

    def add(self, kind: str, item: tuple[Any, ...]) -> None:
        """Store one parsed row (see `_parsed`); a row imported before adds nothing."""
        row_key, system, turns, fmt, *rest = item
        user_message_id = self.context(system, turns, fmt)
        if kind == "preferences":
            chosen, rejected, chosen_ended, rejected_ended = rest
            a, b = self.reply(user_message_id, chosen, chosen_ended), self.reply(user_message_id, rejected, rejected_ended)
            self.store.record_comparison(self.user, a, b, "A", client_id=f"import:{self.source}:pair:{row_key}")
        elif kind == "sft":
            self.store.record_demonstration(self.user, user_message_id, rest[0],
                                            client_id=f"import:{self.source}:demo:{row_key}")


def _parsed(rows: Iterable[dict[str, Any]], kind: str, max_chars: int,
            max_system_chars: int | None = None) -> list[tuple[Any, ...]]:
    parsed = []
    occurrences: Counter[str] = Counter()
    for n, row in enumerate(rows, 1):
        where = f"row {n}"
        if not isinstance(row, dict):
            raise InvalidInputError(f"{where} is not a JSON object.")
        _check_encodable(row, where)
        if "prompt" not in row and kind != "sft":
            raise InvalidInputError(
                f"{where} has no 'prompt'; alignloop imports explicit-prompt rows (TRL's prompt/chosen/rejected)."
            )
        digest = _digest(row)
        occurrences[digest] += 1
        row_key = f"{digest}:{occurrences[digest]}"
        if kind == "preferences":
            system, turns, fmt = _turns(row["prompt"], where, max_chars=max_chars, max_system_chars=max_system_chars)
            chosen = _completion(row.get("chosen"), where, "chosen", fmt, max_chars=max_chars)
            rejected = _completion(row.get("rejected"), where, "rejected", fmt, max_chars=max_chars)
            # Refuse what the preference export never produces (see exports._clean_votes).
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise InvalidInputError(f"{where}: '{name}' is empty; a pair needs two replies, drop the row.")
            if chosen.strip() == rejected.strip():
                raise InvalidInputError(
                    f"{where}: chosen and rejected are the same text (ignoring whitespace), so the row says "
                    "nothing; drop the row."
                )
            ends = row.get("chosen_ended", True), row.get("rejected_ended", True)
            if not all(isinstance(e, bool) for e in ends):
                raise InvalidInputError(f"{where}: 'chosen_ended' and 'rejected_ended' are true or false (false: the "
                                        f"reply was cut off at a token limit), not {ends!r}.")
            parsed.append((row_key, system, turns, fmt, chosen, rejected, *ends))
        elif kind == "sft":
            if "messages" in row:
                msgs = row["messages"]
                if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                        or msgs[-1].get("role") != "assistant":
                    raise InvalidInputError(f"{where}: 'messages' must end with an assistant turn.")
                system, turns, fmt = _turns(msgs[:-1], where, max_chars=max_chars, max_system_chars=max_system_chars)
                reply = _completion(msgs[-1:], where, "messages[-1]", "chat", max_chars=max_chars)
            elif "prompt" in row and "completion" in row:
                system, turns, fmt = _turns(row["prompt"], where, max_chars=max_chars, max_system_chars=max_system_chars)
                reply = _completion(row["completion"], where, "completion", fmt, max_chars=max_chars)
            else:
                raise InvalidInputError(f"{where}: an SFT row has 'messages', or 'prompt' and 'completion'.")
            if not reply.strip():
                raise InvalidInputError(f"{where}: the demonstration is empty.")
            parsed.append((row_key, system, turns, fmt, reply))
        elif kind == "prompts":
            system, turns, fmt = _turns(row["prompt"], where, max_chars=max_chars, max_system_chars=max_system_chars)
            parsed.append((row_key, system, turns, fmt))
        else:
            raise InvalidInputError(f"import kind must be preferences, sft or prompts, not {kind!r}.")
    return parsed


def import_rows(store: FeedbackStore, rows: Iterable[dict[str, Any]], kind: str, *, source: str = "import",
                batch_rows: int | None = None, progress: Callable[[int, int], None] | None = None) -> ImportResult:
    """Import TRL-format rows of `kind` (preferences, sft or prompts).

    Every row is checked first: a bad row raises InvalidInputError naming it, and nothing is
    written. The rows then land `batch_rows` per transaction (default
    `store.config.import_batch_rows`), writers queued for the lock going first between two
    batches; `progress(rows_done, rows_total)` is called after each batch. Called inside the
    caller's own `store.transaction()`, the whole import joins that transaction instead.
    """
    batch_rows = store.config.import_batch_rows if batch_rows is None else batch_rows
    if batch_rows < 1:
        raise InvalidInputError(f"an import commits at least 1 row per batch, not {batch_rows}.")
    parsed = _parsed(rows, kind, store.config.max_text_chars, store.config.max_system_prompt_chars)
    importer = _Importer(store, source)
    new = 0
    for start in range(0, len(parsed), batch_rows):
        if start:
            store.let_writers_in()
        with store.transaction():
            # Every new record takes one event id; no one else writes while we hold the lock.
            before = store.snapshot()
            for item in parsed[start : start + batch_rows]:
                importer.add(kind, item)
            new += store.snapshot() - before
        if progress is not None:
            progress(min(start + batch_rows, len(parsed)), len(parsed))
    return ImportResult(rows=len(parsed), new_records=new, source=source)


def import_jsonl(store: FeedbackStore, path: str | Path, kind: str, *, source: str | None = None,
                 batch_rows: int | None = None, progress: Callable[[int, int], None] | None = None) -> ImportResult:
    """Import a JSONL(.gz) file (see `import_rows`); `source` (default: the file name) names the
    external model version."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"no file {path}.")
    source = source or path.name.removesuffix(".gz").removesuffix(".jsonl")
    return import_rows(store, read_jsonl(path), kind, source=source, batch_rows=batch_rows, progress=progress)
