"""Training data out of the feedback store, reproducible from a snapshot.

Every export reads only events with `event_id <= snapshot` (default: the latest), so
re-running it with the same snapshot gives the same rows byte for byte, whatever was
recorded since. Rows follow TRL's dataset conventions:

* SFT: conversational `{"messages": [..., {"role": "assistant", ...}]}`, or
  `{"prompt": str, "completion": str}` for contexts imported as plain-text prompts.
* Preferences: `{"prompt", "chosen", "rejected"}` (conversational lists, or strings for
  plain-text imports), or per-prompt groups for K-wise reward-model batches.
* PPO prompts: `{"prompt": [...]}`, deduplicated.

Preference pairs come from three kinds of feedback on replies to the same context:
a K-ranking gives its C(K,2) ordered pairs; a pairwise vote A/B gives one pair (tie and
both-bad give none); a reply with net thumbs up and one with net thumbs down give one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidInputError
from .store import Context, FeedbackStore

Prompt = str | list[dict[str, str]]
ExportKind = Literal["sft", "preferences", "prompts"]


@dataclass
class PreferenceGroup:
    """All preference pairs over the replies to one context: each reply appears once."""

    context_id: int
    prompt: Prompt
    completions: list[str]
    completion_ids: list[int]
    pairs: list[tuple[int, int]]  # (index of preferred, index of dispreferred) into completions
    sources: list[str] = field(default_factory=list)  # ranking | comparison | thumbs, one per pair


@dataclass
class Export:
    """Rows of one export and the snapshot (last event id) they were read at."""

    rows: list[dict[str, Any]]
    snapshot: int


def prompt_value(ctx: Context) -> Prompt:
    """A context in TRL form: a string for plain-text imports, else a list of messages."""
    if ctx.prompt_format == "text" and not ctx.system_prompt and len(ctx.messages) == 1:
        return ctx.messages[0]["content"]
    return ctx.as_chat()


def _completion_value(ctx: Context, text: str) -> str | list[dict[str, str]]:
    return text if isinstance(prompt_value(ctx), str) else [{"role": "assistant", "content": text}]


def _snapshot(store: FeedbackStore, snapshot: int | None) -> int:
    latest = store.snapshot()
    if snapshot is None:
        return latest
    if snapshot < 0 or snapshot > latest:
        raise InvalidInputError(f"snapshot {snapshot} is out of range; the latest event is {latest}.")
    return snapshot


def _reply_scores(store: FeedbackStore, snapshot: int) -> dict[int, tuple[int, int, int]]:
    """message id -> (net score, context id, last rating event), from each user's latest rating."""
    rows = store.db.query(
        """
        SELECT r.message_id, m.parent_id AS context_id, SUM(r.value) AS score, MAX(r.event_id) AS last_event
        FROM ratings r JOIN messages m ON m.id = r.message_id
        WHERE r.event_id <= :snap AND r.event_id = (
            SELECT MAX(r2.event_id) FROM ratings r2
            WHERE r2.user_id = r.user_id AND r2.message_id = r.message_id AND r2.event_id <= :snap)
        GROUP BY r.message_id ORDER BY r.message_id
        """,
        {"snap": snapshot},
    )
    return {r["message_id"]: (r["score"], r["context_id"], r["last_event"]) for r in rows}


def _ordered_pairs(store: FeedbackStore, snapshot: int, include_thumbs: bool) -> list[tuple[int, int, int, int, str]]:
    """(event, context, winner message, loser message, source), in the order the feedback arrived."""
    pairs: list[tuple[int, int, int, int, str]] = []
    for r in store.db.query(
        "SELECT * FROM comparisons WHERE event_id <= ? AND choice IN ('A', 'B') ORDER BY event_id", [snapshot]
    ):
        win, lose = (r["message_a"], r["message_b"]) if r["choice"] == "A" else (r["message_b"], r["message_a"])
        pairs.append((r["event_id"], r["context_id"], win, lose, "comparison"))
    for r in store.db.query("SELECT * FROM rankings WHERE event_id <= ? ORDER BY event_id", [snapshot]):
        ranked = [
            i["message_id"]
            for i in store.db.query(
                "SELECT message_id FROM ranking_items WHERE ranking_id = ? ORDER BY position", [r["id"]]
            )
        ]
        # A K-ranking gives all C(K,2) ordered pairs (InstructGPT section 3.5).
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                pairs.append((r["event_id"], r["context_id"], ranked[i], ranked[j], "ranking"))
    if include_thumbs:
        by_context: dict[int, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: {"up": [], "down": []})
        for message_id, (score, context_id, last_event) in _reply_scores(store, snapshot).items():
            if score > 0:
                by_context[context_id]["up"].append((message_id, last_event))
            elif score < 0:
                by_context[context_id]["down"].append((message_id, last_event))
        for context_id, sides in by_context.items():
            for up, up_event in sides["up"]:
                for down, down_event in sides["down"]:
                    pairs.append((max(up_event, down_event), context_id, up, down, "thumbs"))
    pairs.sort(key=lambda p: (p[0], p[4]))  # stable: within one ranking, the C(K,2) order is kept
    return pairs


def _message_texts(store: FeedbackStore, ids: Iterable[int]) -> dict[int, str]:
    ids = sorted(set(ids))
    texts: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in store.db.query(f"SELECT id, content FROM messages WHERE id IN ({marks})", chunk):
            texts[r["id"]] = r["content"]
    return texts


def export_preference_groups(store: FeedbackStore, snapshot: int | None = None, *,
                             include_thumbs: bool = True) -> tuple[list[PreferenceGroup], int]:
    """Preference pairs grouped per context, in order of each context's first feedback."""
    snapshot = _snapshot(store, snapshot)
    pairs = _ordered_pairs(store, snapshot, include_thumbs)
    texts = _message_texts(store, [m for p in pairs for m in p[2:4]])
    groups: dict[int, PreferenceGroup] = {}
    for _, context_id, win, lose, source in pairs:
        group = groups.get(context_id)
        if group is None:
            group = groups[context_id] = PreferenceGroup(
                context_id, prompt_value(store.context(context_id)), [], [], [], []
            )
        for m in (win, lose):
            if m not in group.completion_ids:
                group.completion_ids.append(m)
                group.completions.append(texts[m])
        group.pairs.append((group.completion_ids.index(win), group.completion_ids.index(lose)))
        group.sources.append(source)
    return list(groups.values()), snapshot


def export_preferences(store: FeedbackStore, snapshot: int | None = None, *, fmt: str = "trl",
                       include_thumbs: bool = True) -> Export:
    """Preference data: `fmt="trl"` gives one prompt/chosen/rejected row per pair, in the
    order the feedback arrived; `fmt="groups"` one row per context for K-wise RM batches."""
    if fmt not in ("trl", "groups"):
        raise InvalidInputError(f"preferences export as 'trl' or 'groups', not {fmt!r}.")
    snapshot = _snapshot(store, snapshot)
    if fmt == "groups":
        groups, _ = export_preference_groups(store, snapshot, include_thumbs=include_thumbs)
        return Export([{**asdict(g), "pairs": [list(p) for p in g.pairs]} for g in groups], snapshot)
    pairs = _ordered_pairs(store, snapshot, include_thumbs)
    texts = _message_texts(store, [m for p in pairs for m in p[2:4]])
    contexts: dict[int, Context] = {}
    rows = []
    for _, context_id, win, lose, _source in pairs:
        ctx = contexts.get(context_id) or contexts.setdefault(context_id, store.context(context_id))
        rows.append(
            {
                "prompt": prompt_value(ctx),
                "chosen": _completion_value(ctx, texts[win]),
                "rejected": _completion_value(ctx, texts[lose]),
            }
        )
    return Export(rows, snapshot)


def export_sft(store: FeedbackStore, snapshot: int | None = None, *, include_thumbs_up: bool = False) -> Export:
    """Demonstrations (and optionally replies with net thumbs up) as SFT examples."""
    snapshot = _snapshot(store, snapshot)
    items: list[tuple[int, int, str]] = [
        (r["event_id"], r["context_id"], r["content"])
        for r in store.db.query(
            "SELECT event_id, context_id, content FROM demonstrations WHERE event_id <= ? ORDER BY event_id",
            [snapshot],
        )
    ]
    if include_thumbs_up:
        liked = [(ev, ctx, mid) for mid, (score, ctx, ev) in _reply_scores(store, snapshot).items() if score > 0]
        texts = _message_texts(store, [m for *_, m in liked])
        items += [(ev, ctx, texts[mid]) for ev, ctx, mid in liked]
        items.sort(key=lambda item: item[0])
    rows = []
    for _, context_id, reply in items:
        ctx = store.context(context_id)
        prompt = prompt_value(ctx)
        if isinstance(prompt, str):
            rows.append({"prompt": prompt, "completion": reply})
        else:
            rows.append({"messages": prompt + [{"role": "assistant", "content": reply}]})
    return Export(rows, snapshot)


def export_ppo_prompts(store: FeedbackStore, snapshot: int | None = None) -> Export:
    """Every user turn with its context, deduplicated, oldest first."""
    snapshot = _snapshot(store, snapshot)
    seen: set[str] = set()
    rows = []
    for r in store.db.query(
        "SELECT id FROM messages WHERE role = 'user' AND event_id <= ? ORDER BY event_id", [snapshot]
    ):
        prompt = prompt_value(store.context(r["id"]))
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": prompt})
    return Export(rows, snapshot)


def export(store: FeedbackStore, kind: ExportKind, snapshot: int | None = None, *, fmt: str = "trl",
           include_thumbs: bool = True) -> Export:
    """One entry point for the CLI: `kind` is sft, preferences or prompts."""
    if kind == "sft":
        return export_sft(store, snapshot, include_thumbs_up=include_thumbs)
    if kind == "preferences":
        return export_preferences(store, snapshot, fmt=fmt, include_thumbs=include_thumbs)
    if kind == "prompts":
        return export_ppo_prompts(store, snapshot)
    raise InvalidInputError(f"export kind must be sft, preferences or prompts, not {kind!r}.")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as UTF-8 JSON lines (atomically: temp file, then rename); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
