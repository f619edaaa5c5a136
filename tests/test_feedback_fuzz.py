"""Fuzzing the store's record and export API (hypothesis).

Properties, for any sequence of calls with any arguments:
1. every call either succeeds or raises a FeedbackError (nothing else escapes the store);
2. the database stays `PRAGMA integrity_check` ok, with no dangling foreign key;
3. every export is valid JSONL (UTF-8, round-trips through write_jsonl / read_jsonl) and its
   rows satisfy the export invariants: non-empty texts, chosen != rejected, boolean labels.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedback_db import (
    CHOICES,
    FeedbackError,
    FeedbackStore,
    ModelRegistry,
    Reply,
    export_ppo_prompts,
    export_preference_groups,
    export_preferences,
    export_sft,
    export_thumbs,
    read_jsonl,
    write_jsonl,
)



def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Most draws are well-formed (so calls get deep into the store), some are anything."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: valid if ok else wild)


# Text as users, browsers and scripts send it: ordinary, empty, whitespace, NUL, lone surrogates, huge.
ANY_CHAR = st.characters(codec=None, exclude_categories=())  # surrogates included
wild_texts = st.one_of(
    st.text(alphabet=ANY_CHAR, max_size=12),
    st.sampled_from(["", " ", "\n\t", "\x00", "a\x00b", "\ud800", "ok\udfff", "same", " same ", "<b>x</b>"]),
    st.integers(3_990, 4_010).map(lambda n: "s" * n),
    st.integers(31_990, 32_010).map(lambda n: "L" * n),
    st.binary(max_size=8),
    st.integers(),
)
texts = mostly(st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(["same", " same", "A", "B", "😀"])),
               wild_texts)
maybe_texts = st.one_of(st.none(), st.none(), texts)
numbers = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-(2**70), 2**70))
wild_values = st.one_of(numbers, st.none(), st.booleans(), wild_texts, st.lists(st.integers(), max_size=2))
# Ids: mostly ones that exist (an index into what was created), sometimes anything at all.
ids = mostly(st.integers(0, 12).map(lambda i: ("known", i)), wild_values)
users = mostly(st.sampled_from([0, 0, 0, 1]).map(lambda i: ("known", i)), wild_values)
client_ids = mostly(st.one_of(st.none(), st.sampled_from(["c1", "c2"])), wild_texts)
sampling = mostly(
    st.dictionaries(st.sampled_from(["temperature", "top_p", "max_tokens", "seed"]),
                    st.floats(0, 2), max_size=3),
    st.one_of(st.dictionaries(st.sampled_from(["temperature", "stop"]),
                              st.one_of(numbers, wild_texts, st.lists(numbers, max_size=2)), max_size=2),
              st.just({"temperature": float("nan")}), st.just([1, 2]), st.none()),
)
reasons = mostly(st.one_of(st.none(), st.lists(st.sampled_from(["unhelpful", "made up facts", "rude"]), max_size=3)),
                 st.one_of(st.lists(wild_texts, max_size=3), wild_texts))
optional_numbers = mostly(st.one_of(st.none(), st.integers(0, 5000)), numbers)

ops = st.one_of(
    st.tuples(st.just("conversation"), users, maybe_texts, maybe_texts,
              mostly(st.sampled_from(["chat", "compare", "rank", "import"]), wild_values), client_ids),
    st.tuples(st.just("user_message"), ids, users, texts, st.one_of(st.none(), ids), client_ids),
    st.tuples(st.just("reply"), ids, users, ids, st.one_of(texts, st.just("")), sampling,
              mostly(st.sampled_from([None, "stop", "length", "error", "abort"]), wild_values),
              optional_numbers, optional_numbers),
    st.tuples(st.just("rating"), users, ids, mostly(st.sampled_from([-1, 0, 1]), wild_values),
              reasons, maybe_texts, client_ids),
    st.tuples(st.just("comparison"), users, ids, ids, mostly(st.sampled_from(CHOICES), wild_values), client_ids),
    st.tuples(st.just("ranking"), users, mostly(ids, st.one_of(st.lists(ids, max_size=10), wild_values)), client_ids),
    st.tuples(st.just("demonstration"), users, ids, texts, st.one_of(st.none(), ids), client_ids),
)


def _get(table: dict, key: Any, default: Any = None) -> Any:
    """`table.get(key)` for keys of any type (a wild id may be a list)."""
    return table.get(key, default) if isinstance(key, int) else default


class _World:
    """What the calls created so far, so that most ids refer to real rows of the right kind."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self.version = ModelRegistry(store).ensure_base_policy("tiny").id
        self.users = [store.ensure_user(name) for name in ("alice", "bob")]
        self.conversations: list[int] = []
        self.questions: list[int] = []  # user messages
        self.replies: list[int] = []
        self.conversation_of: dict[int, int] = {}
        self.parent_of: dict[int, int] = {}

    def user(self, value: Any) -> Any:
        return self.users[value[1]] if isinstance(value, tuple) and value and value[0] == "known" else value

    @staticmethod
    def id(value: Any, pool: list[int]) -> Any:
        if isinstance(value, tuple) and value and value[0] == "known":
            return pool[-1 - value[1] % len(pool)] if pool else value[1]  # recent rows first
        return value

    def message(self, message_id: int, conversation: int, parent: int | None) -> None:
        self.conversation_of[message_id] = conversation
        if parent is not None:
            self.parent_of[message_id] = parent

    def apply(self, op: tuple) -> None:
        s, kind = self.store, op[0]
        if kind == "conversation":
            _, user, system, title, source, client = op
            self.conversations.append(s.create_conversation(self.user(user), system_prompt=system, title=title,
                                                            source=source, client_id=client))
        elif kind == "user_message":
            _, conv, user, text, parent, client = op
            parent = None if parent is None else self.id(parent, self.replies)
            conv = _get(self.conversation_of, parent, self.id(conv, self.conversations)) \
                if isinstance(conv, tuple) else conv
            new = s.add_user_message(conv, self.user(user), text, parent_id=parent, client_id=client)
            self.questions.append(new)
            self.message(new, conv, parent)
        elif kind == "reply":
            _, conv, user, parent, text, sampling_, finish, latency, tokens = op
            parent = self.id(parent, self.questions)
            conv = _get(self.conversation_of, parent, conv) if isinstance(conv, tuple) else conv
            reply = Reply(self.version, sampling_, latency, tokens, tokens, finish)
            new = s.add_reply(self.id(conv, self.conversations), self.user(user), parent, text, reply)
            self.replies.append(new)
            self.message(new, conv, parent)
        elif kind == "rating":
            _, user, message, value, reasons_, comment, client = op
            s.record_rating(self.user(user), self.id(message, self.replies), value, reasons=reasons_,
                            comment=comment, client_id=client)
        elif kind == "comparison":
            _, user, a, b, choice, client = op
            a = self.id(a, self.replies)
            siblings = [r for r in self.replies if r != a and self.parent_of.get(r) == _get(self.parent_of, a)]
            b = siblings[-1] if isinstance(b, tuple) and siblings else self.id(b, self.replies)
            s.record_comparison(self.user(user), a, b, choice, client_id=client)
        elif kind == "ranking":
            _, user, ranked, client = op
            if isinstance(ranked, tuple) and ranked and ranked[0] == "known":  # all replies to one message
                first = self.id(ranked, self.replies)
                ranked = [r for r in self.replies if self.parent_of.get(r) == _get(self.parent_of, first)]
            elif isinstance(ranked, list):
                ranked = [self.id(r, self.replies) for r in ranked]
            s.record_ranking(self.user(user), ranked, client_id=client)
        elif kind == "demonstration":
            _, user, context, text, replaces, client = op
            context = self.id(context, self.questions)
            if isinstance(replaces, tuple):
                answers = [r for r in self.replies if self.parent_of.get(r) == context]
                replaces = answers[-1] if answers else self.id(replaces, self.replies)
            s.record_demonstration(self.user(user), context, text, replaces_message_id=replaces, client_id=client)


def _texts_of(value: Any) -> list[str]:
    """The completion text(s) of an export field: a string, or a list of messages."""
    if isinstance(value, str):
        return [value]
    return [m["content"] for m in value]


def _check_exports(store: FeedbackStore, out: Path) -> None:
    prefs = export_preferences(store)
    for row in prefs.rows:
        chosen, rejected = _texts_of(row["chosen"])[-1], _texts_of(row["rejected"])[-1]
        assert chosen.strip() and rejected.strip(), row
        assert chosen.strip() != rejected.strip(), row
        assert _texts_of(row["prompt"]), row
    for group in export_preference_groups(store)[0]:
        assert len({c.strip() for c in group.completions}) == len(group.completions)
        assert all(i != j for i, j in group.pairs)
    thumbs = export_thumbs(store)
    for row in thumbs.rows:
        assert isinstance(row["label"], bool) and _texts_of(row["completion"])[-1].strip(), row
    sft = export_sft(store, include_thumbs_up=True)
    for row in sft.rows:
        completion = row["messages"][-1]["content"] if "messages" in row else row["completion"]
        assert completion.strip(), row
    prompts = export_ppo_prompts(store)
    for name, export in (("prefs", prefs), ("thumbs", thumbs), ("sft", sft), ("prompts", prompts)):
        path = out / f"{name}.jsonl"
        write_jsonl(export.rows, path)
        path.read_bytes().decode("utf-8")  # strict UTF-8: no surrogate escaped its way in
        assert list(read_jsonl(path)) == export.rows
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:  # JSONL lines end at \n only (text may hold U+0085, U+2028)
            json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"JSON constant {c}")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(ops, min_size=1, max_size=15))
def test_any_calls_either_succeed_or_raise_feedback_errors_and_keep_the_database_sound(calls):
    with tempfile.TemporaryDirectory() as tmp, FeedbackStore(Path(tmp) / "fuzz.db") as store:
        world = _World(store)
        # Seed one well-formed exchange so that later calls have real rows to hit.
        for user in reversed(world.users):  # alice's rows last: most calls are hers
            world.apply(("conversation", ("known", world.users.index(user)), None, None, "chat", None))
            world.apply(("user_message", ("known", 0), ("known", world.users.index(user)), "What is 2+2?", None, None))
            for text in ("4", "5", "4 "):
                world.apply(("reply", ("known", 0), ("known", world.users.index(user)), ("known", 0), text, {}, None,
                             None, None))
        for op in calls:
            try:
                world.apply(op)
            except FeedbackError:
                pass  # refused: the property is that nothing else is raised
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
        for (text,) in store.db.execute("SELECT sampling FROM messages WHERE sampling IS NOT NULL"):
            assert all(math.isfinite(v) for v in _numbers(json.loads(text)))
        _check_exports(store, Path(tmp))


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
