"""Training data out of the feedback store, reproducible from a snapshot.

Every export reads only events with `event_id <= snapshot` (default: the latest), so
re-running it with the same snapshot gives the same rows byte for byte, whatever was
recorded since. Rows follow TRL's dataset conventions:

* SFT: conversational `{"messages": [..., {"role": "assistant", ...}]}`, or
  `{"prompt": str, "completion": str}` for contexts imported as plain-text prompts.
* Preferences: `{"prompt", "chosen", "rejected"}` (conversational lists, or strings for
  plain-text imports), with `chosen_ended`/`rejected_ended` false for a reply the server cut
  off at its token limit (absent: it ended), or per-prompt groups for K-wise reward-model batches (with `ended` per
  completion: false for a reply the server cut off at its token limit).
* Thumbs: TRL's unpaired preference (KTO) rows `{"prompt", "completion", "label"}`, plus `ended`.
* PPO prompts: `{"prompt": [...]}`, deduplicated.

Preference pairs are votes on two replies to the same context: a K-ranking gives its C(K,2)
ordered pairs; a pairwise vote A/B one pair (tie and both-bad are votes for neither); a
user's thumbs-up reply and thumbs-down reply to the same context one pair; a demonstration
that replaces a reply one pair (the demonstration chosen). A pair is identified by its prompt
(contexts asking the same thing, in any conversation, share it) and its two texts, whitespace
stripped. The votes are then cleaned (`_clean_votes`), and every vote that does not become a
row is counted in `Export.dropped` under one reason (DROP_REASONS): votes = rows + sum(dropped).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .counting import CUT_OFF_FINISH_REASON, latest_ratings
from .errors import InvalidInputError
from .store import UNVOTABLE_FINISH_REASONS, Context, FeedbackStore

Prompt = str | list[dict[str, str]]
ExportKind = Literal["sft", "preferences", "thumbs", "prompts"]

# Why a vote (or, for the thumbs export, a rating) did not become a row: the keys of Export.dropped.
DROP_REASONS: dict[str, str] = {
    "failed_or_stopped_reply": "a reply the engine failed on or the user stopped (finish_reason error or abort)",
    "empty_text": "a reply with no text (whitespace only)",
    "cut_off_reply": "an SFT target the server cut off at its token limit: it would teach the model to stop "
                     "mid-sentence (preference and thumbs rows keep such replies, marked ended: false)",
    "identical_texts": "chosen and rejected are the same text once whitespace is stripped (within one "
                       "ranking: a reply repeating the text of a better-ranked one)",
    "superseded_by_same_user": "the same user voted on the same two texts again later (the latest vote counts)",
    "duplicate_vote": "another user's vote for the same pair in the same order: merged into the kept row",
    "outvoted": "more users preferred the other text of the pair",
    "tied_across_users": "as many users preferred either text: the pair is dropped",
    "cleared": "the user's latest rating of the reply is 0 (cleared)",
}


@dataclass
class PreferenceGroup:
    """All preference pairs over the replies to one prompt: each distinct text appears once."""

    user_message_id: int  # the first context (user message) with this prompt that gave a pair
    prompt: Prompt
    completions: list[str]
    completion_ids: list[int | None]  # the message holding each completion; None: a demonstration's text
    pairs: list[tuple[int, int]]  # (index of preferred, index of dispreferred) into completions
    sources: list[str] = field(default_factory=list)  # ranking | comparison | thumbs | demonstration, one per pair
    ended: list[bool] = field(default_factory=list)  # per completion: False when the server cut it at its token limit


@dataclass
class Export:
    """Rows of one export, the snapshot (last event id) they were read at, and what was left out."""

    rows: list[dict[str, Any]]
    snapshot: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason (DROP_REASONS) -> count

    def summary(self, kind: str) -> str:
        """One line for people: how many rows were kept and what was dropped, by reason."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.dropped.items())
        dropped = f"dropped {sum(self.dropped.values())} ({reasons})" if self.dropped else "dropped 0"
        return f"{len(self.rows)} {kind} rows at snapshot {self.snapshot}; {dropped}"


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


def _counted(counter: Counter[str]) -> dict[str, int]:
    """Dropped counts in DROP_REASONS order, zeros left out: the same dict for the same data."""
    return {reason: counter[reason] for reason in DROP_REASONS if counter[reason]}


@dataclass(frozen=True)
class _Reply:
    """What the cleaning rules need of one reply (a stored message, or a demonstration's text)."""

    message_id: int | None  # None: a demonstration's own text, which is not a message
    text: str
    finish_reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.finish_reason in UNVOTABLE_FINISH_REASONS

    @property
    def ended(self) -> bool:
        """Whether the reply ended on its own: not cut off at the server's token limit."""
        return self.finish_reason != CUT_OFF_FINISH_REASON


@dataclass(frozen=True)
class _Vote:
    """One user's preference between two replies to one context, from one feedback row."""

    user_id: str
    user_message_id: int
    prompt: str  # the context's prompt in TRL form, as canonical JSON: the same question asked twice is one
    winner: _Reply
    loser: _Reply
    event: int  # the event that made this vote (a thumbs pair: the later of its two ratings)
    seq: int  # order among the votes of one event: a ranking's pairs best positions first
    source: str  # ranking | comparison | thumbs | demonstration
    abstain: bool = False  # a tie / both-bad comparison: a vote for neither reply

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        """What the vote is about: the prompt and the unordered pair of (whitespace-stripped) texts."""
        return self.prompt, frozenset((self.winner.text.strip(), self.loser.text.strip()))

    @property
    def direction(self) -> str:
        return self.winner.text.strip()


def _prompt_key(ctx: Context) -> str:
    """A context's prompt (TRL form) as canonical JSON: contexts asking the same thing share it."""
    return json.dumps(prompt_value(ctx), sort_keys=True, ensure_ascii=False)


def _replies(store: FeedbackStore, ids: Iterable[int]) -> dict[int, _Reply]:
    """message id -> _Reply (its text and finish_reason)."""
    ids = sorted(set(ids))
    replies: dict[int, _Reply] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in store.db.query(f"SELECT id, content, finish_reason FROM messages WHERE id IN ({marks})", chunk):
            replies[r["id"]] = _Reply(r["id"], r["content"], r["finish_reason"])
    return replies


def _latest_ratings(store: FeedbackStore, snapshot: int) -> list[dict[str, Any]]:
    """Each user's latest rating of each reply (value 0 = cleared), oldest first, with the reply's
    context: the rule of counting.py, which the dashboard counts by too."""
    return latest_ratings(store.db, snapshot)


def _votes(store: FeedbackStore, snapshot: int, include_thumbs: bool) -> list[_Vote]:
    """Every preference vote up to `snapshot`, uncleaned, in no particular order."""
    raw: list[tuple[str, int, int | str, int, int, str, bool]] = []  # user, ctx, winner, loser, event, source, abstain
    for r in store.db.query("SELECT * FROM comparisons WHERE event_id <= ? ORDER BY event_id", [snapshot]):
        win, lose = (r["message_b"], r["message_a"]) if r["choice"] == "B" else (r["message_a"], r["message_b"])
        abstain = r["choice"] not in ("A", "B")  # tie / both_bad: a vote for neither reply
        raw.append((r["user_id"], r["user_message_id"], win, lose, r["event_id"], "comparison", abstain))
    ranked: dict[int, list[int]] = defaultdict(list)
    rankings = list(store.db.query("SELECT * FROM rankings WHERE event_id <= ? ORDER BY event_id", [snapshot]))
    for i in store.db.query(
        "SELECT ranking_id, message_id FROM ranking_items i JOIN rankings r ON r.id = i.ranking_id"
        " WHERE r.event_id <= ? ORDER BY ranking_id, position", [snapshot]
    ):
        ranked[i["ranking_id"]].append(i["message_id"])
    for r in rankings:
        ids = ranked[r["id"]]
        # A K-ranking gives all C(K,2) ordered pairs (InstructGPT section 3.5), best positions first.
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                raw.append((r["user_id"], r["user_message_id"], ids[i], ids[j], r["event_id"], "ranking", False))
    if include_thumbs:
        sides: dict[tuple[str, int], dict[int, list[tuple[int, int]]]] = defaultdict(lambda: {1: [], -1: []})
        for r in _latest_ratings(store, snapshot):
            if r["value"]:
                sides[(r["user_id"], r["user_message_id"])][r["value"]].append((r["message_id"], r["event_id"]))
        for (user_id, user_message_id), side in sides.items():
            for up, up_event in side[1]:
                for down, down_event in side[-1]:
                    raw.append((user_id, user_message_id, up, down, max(up_event, down_event), "thumbs", False))
    demos = list(store.db.query(
        "SELECT user_id, user_message_id, content, replaces_message_id, event_id FROM demonstrations"
        " WHERE event_id <= ? AND replaces_message_id IS NOT NULL ORDER BY event_id", [snapshot]
    ))
    replies = _replies(store, [m for v in raw for m in v[2:4]] + [d["replaces_message_id"] for d in demos])
    prompts = {c: _prompt_key(store.context(c)) for c in sorted({v[1] for v in raw} | {d["user_message_id"] for d in demos})}
    votes = [
        _Vote(user, ctx, prompts[ctx], replies[win], replies[lose], event, seq, source, abstain)
        for seq, (user, ctx, win, lose, event, source, abstain) in enumerate(raw)
    ]
    votes += [
        _Vote(d["user_id"], d["user_message_id"], prompts[d["user_message_id"]], _Reply(None, d["content"]),
              replies[d["replaces_message_id"]], d["event_id"], len(raw) + n, "demonstration")
        for n, d in enumerate(demos)
    ]
    return votes


def _clean_votes(votes: list[_Vote]) -> tuple[list[_Vote], dict[str, int]]:
    """The votes that become pairs, oldest first, and the others counted by reason (DROP_REASONS).

    1. A vote on a failed or stopped reply, on an empty reply, or on two texts that are the
       same once whitespace is stripped gives no pair.
    2. Per user, the latest vote on a pair of texts (same prompt, either order) counts: a
       later one, including a tie, supersedes it. Within one event (one ranking) the vote from
       the best positions counts: a reply repeating a better-ranked text adds nothing.
    3. Across users, the majority of their votes on the pair decides; the kept row is the
       latest majority vote, its other votes are duplicates; a tie between users drops the pair.
    """
    dropped: Counter[str] = Counter()
    valid: list[_Vote] = []
    for v in votes:
        if v.winner.failed or v.loser.failed:
            reason = "failed_or_stopped_reply"
        elif not v.winner.text.strip() or not v.loser.text.strip():
            reason = "empty_text"
        elif v.winner.text.strip() == v.loser.text.strip():
            reason = "identical_texts"
        else:
            valid.append(v)
            continue
        if not v.abstain:
            dropped[reason] += 1

    def recency(v: _Vote) -> tuple[int, int]:
        return v.event, -v.seq

    per_user: dict[tuple[str, str, frozenset[str]], list[_Vote]] = defaultdict(list)
    for v in valid:
        per_user[(v.user_id, *v.key)].append(v)
    by_pair: dict[tuple[str, frozenset[str]], list[_Vote]] = defaultdict(list)
    for user_votes in per_user.values():
        latest = max(user_votes, key=recency)
        for v in user_votes:
            if v is not latest and not v.abstain:
                dropped["identical_texts" if v.event == latest.event else "superseded_by_same_user"] += 1
        if not latest.abstain:
            by_pair[latest.key].append(latest)
    kept: list[_Vote] = []
    for pair_votes in by_pair.values():
        counts = Counter(v.direction for v in pair_votes)
        if len(counts) == 2 and len(set(counts.values())) == 1:
            dropped["tied_across_users"] += len(pair_votes)
            continue
        majority, n = counts.most_common(1)[0]
        dropped["outvoted"] += len(pair_votes) - n
        dropped["duplicate_vote"] += n - 1
        kept.append(max((v for v in pair_votes if v.direction == majority), key=recency))
    kept.sort(key=lambda v: (v.event, v.seq))
    return kept, _counted(dropped)


def _clean_pairs(store: FeedbackStore, snapshot: int, include_thumbs: bool) -> tuple[list[_Vote], dict[str, int]]:
    return _clean_votes(_votes(store, snapshot, include_thumbs))


def _groups(store: FeedbackStore, kept: list[_Vote]) -> list[PreferenceGroup]:
    """Kept pairs grouped per prompt (in order of each prompt's first pair), each text once."""
    groups: dict[str, PreferenceGroup] = {}
    index: dict[str, dict[str, int]] = {}  # prompt -> stripped text -> index into completions
    for v in kept:
        group = groups.get(v.prompt)
        if group is None:
            group = groups[v.prompt] = PreferenceGroup(
                v.user_message_id, prompt_value(store.context(v.user_message_id)), [], [], [], []
            )
            index[v.prompt] = {}
        where = index[v.prompt]
        for reply in (v.winner, v.loser):
            if reply.text.strip() not in where:
                where[reply.text.strip()] = len(group.completions)
                group.completions.append(reply.text)
                group.completion_ids.append(reply.message_id)
                group.ended.append(reply.ended)
        group.pairs.append((where[v.winner.text.strip()], where[v.loser.text.strip()]))
        group.sources.append(v.source)
    return list(groups.values())


def export_preference_groups(store: FeedbackStore, snapshot: int | None = None, *,
                             include_thumbs: bool = True) -> tuple[list[PreferenceGroup], int]:
    """Clean preference pairs grouped per prompt, in order of each prompt's first pair."""
    snapshot = _snapshot(store, snapshot)
    kept, _ = _clean_pairs(store, snapshot, include_thumbs)
    return _groups(store, kept), snapshot


def export_preferences(store: FeedbackStore, snapshot: int | None = None, *, fmt: str = "trl",
                       include_thumbs: bool = True) -> Export:
    """Clean preference data: `fmt="trl"` gives one prompt/chosen/rejected row per pair, in the
    order the deciding votes arrived; `fmt="groups"` one row per prompt for K-wise RM batches.
    `Export.dropped` counts the votes left out, by reason (see `_clean_votes`)."""
    if fmt not in ("trl", "groups"):
        raise InvalidInputError(f"preferences export as 'trl' or 'groups', not {fmt!r}.")
    snapshot = _snapshot(store, snapshot)
    kept, dropped = _clean_pairs(store, snapshot, include_thumbs)
    if fmt == "groups":
        rows = [{**asdict(g), "pairs": [list(p) for p in g.pairs]} for g in _groups(store, kept)]
        return Export(rows, snapshot, dropped)
    contexts: dict[int, Context] = {}
    rows = []
    for v in kept:
        ctx = contexts.get(v.user_message_id) or contexts.setdefault(v.user_message_id, store.context(v.user_message_id))
        row = {"prompt": prompt_value(ctx), "chosen": _completion_value(ctx, v.winner.text),
               "rejected": _completion_value(ctx, v.loser.text)}
        # Only a cut-off reply says so: a row of two ended replies stays exactly TRL's.
        row.update({f"{side}_ended": False for side, reply in (("chosen", v.winner), ("rejected", v.loser))
                    if not reply.ended})
        rows.append(row)
    return Export(rows, snapshot, dropped)


def export_thumbs(store: FeedbackStore, snapshot: int | None = None) -> Export:
    """Unpaired 👍/👎 as TRL's unpaired preference (KTO) rows: one per rated reply,
    `{"prompt", "completion", "label"}` with the same prompt and completion forms as the
    preference export, ordered by each reply's last rating.

    Each user's latest rating of a reply counts (earlier ones: superseded_by_same_user;
    a latest 0: cleared); the label is the sign of their sum, the net vote (users against it:
    outvoted; users beside the first for it: duplicate_vote; a net 0: tied_across_users).
    Failed or stopped and empty replies are left out. Every rating lands in a row or in
    `dropped`.
    """
    snapshot = _snapshot(store, snapshot)
    dropped: Counter[str] = Counter()
    n_ratings = store.db.execute("SELECT COUNT(*) FROM ratings WHERE event_id <= ?", [snapshot]).fetchone()[0]
    latest = _latest_ratings(store, snapshot)
    dropped["superseded_by_same_user"] = n_ratings - len(latest)
    per_reply: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in latest:
        if r["value"] == 0:
            dropped["cleared"] += 1
        else:
            per_reply[r["message_id"]].append(r)
    replies = _replies(store, per_reply)
    kept: list[tuple[int, int, bool]] = []  # (last rating event, message id, label)
    for message_id, ratings in per_reply.items():
        reply = replies[message_id]
        net = sum(r["value"] for r in ratings)
        if reply.failed or not reply.text.strip() or net == 0:
            reason = ("failed_or_stopped_reply" if reply.failed else "empty_text" if not reply.text.strip()
                      else "tied_across_users")
            dropped[reason] += len(ratings)
            continue
        agree = sum(1 for r in ratings if (r["value"] > 0) == (net > 0))
        dropped["duplicate_vote"] += agree - 1
        dropped["outvoted"] += len(ratings) - agree
        kept.append((max(r["event_id"] for r in ratings), message_id, net > 0))
    kept.sort()
    contexts: dict[int, Context] = {}
    rows = []
    for _, message_id, label in kept:
        user_message_id = per_reply[message_id][0]["user_message_id"]
        ctx = contexts.get(user_message_id) or contexts.setdefault(user_message_id, store.context(user_message_id))
        rows.append({"prompt": prompt_value(ctx), "completion": _completion_value(ctx, replies[message_id].text),
                     "label": label, "ended": replies[message_id].ended})
    return Export(rows, snapshot, _counted(dropped))


def export_sft(store: FeedbackStore, snapshot: int | None = None, *, include_thumbs_up: bool = False) -> Export:
    """Demonstrations (and optionally replies with net thumbs up) as SFT examples, oldest first.

    A liked reply counts by the sum of its users' latest ratings; failed or stopped, empty and cut-off
    replies are left out (counted in `dropped`).
    """
    snapshot = _snapshot(store, snapshot)
    items: list[tuple[int, int, str]] = [
        (r["event_id"], r["user_message_id"], r["content"])
        for r in store.db.query(
            "SELECT event_id, user_message_id, content FROM demonstrations WHERE event_id <= ? ORDER BY event_id",
            [snapshot],
        )
    ]
    dropped: Counter[str] = Counter()
    if include_thumbs_up:
        net: dict[int, tuple[int, int, int]] = {}  # message id -> (net score, context id, last rating event)
        for r in _latest_ratings(store, snapshot):
            score, _, event = net.get(r["message_id"], (0, 0, 0))
            net[r["message_id"]] = (score + r["value"], r["user_message_id"], max(event, r["event_id"]))
        liked = {m: (ctx, event) for m, (score, ctx, event) in net.items() if score > 0}
        for message_id, reply in _replies(store, liked).items():
            if reply.failed:
                dropped["failed_or_stopped_reply"] += 1
            elif not reply.text.strip():
                dropped["empty_text"] += 1
            elif not reply.ended:
                dropped["cut_off_reply"] += 1
            else:
                user_message_id, event = liked[message_id]
                items.append((event, user_message_id, reply.text))
        items.sort(key=lambda item: item[0])
    rows = []
    for _, user_message_id, reply_text in items:
        ctx = store.context(user_message_id)
        prompt = prompt_value(ctx)
        if isinstance(prompt, str):
            rows.append({"prompt": prompt, "completion": reply_text})
        else:
            rows.append({"messages": prompt + [{"role": "assistant", "content": reply_text}]})
    return Export(rows, snapshot, _counted(dropped))


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
    """One entry point for the CLI: `kind` is sft, preferences, thumbs or prompts."""
    if kind == "sft":
        return export_sft(store, snapshot, include_thumbs_up=include_thumbs)
    if kind == "preferences":
        return export_preferences(store, snapshot, fmt=fmt, include_thumbs=include_thumbs)
    if kind == "thumbs":
        if fmt != "trl":
            raise InvalidInputError(f"the thumbs export has one format, 'trl' (KTO rows), not {fmt!r}.")
        return export_thumbs(store, snapshot)
    if kind == "prompts":
        return export_ppo_prompts(store, snapshot)
    raise InvalidInputError(f"export kind must be sft, preferences, thumbs or prompts, not {kind!r}.")


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
