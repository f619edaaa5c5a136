"""Clean preference pairs and the thumbs (KTO) export, on hand-made feedback in real SQLite files.

Each test is one rule of feedback_db/exports.py `_clean_votes` (or of `export_thumbs`),
with the rows and the dropped counts written out by hand.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import pytest

from feedback_db import (
    DROP_REASONS,
    FeedbackStore,
    ModelRegistry,
    Reply,
    export_preference_groups,
    export_preferences,
    export_sft,
    export_thumbs,
    import_rows,
)
from feedback_db.exports import _votes

QUESTION = "Capital of France?"


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        yield s


def ask(store, user, texts, *, question=QUESTION, finish=None):
    """`user` asks `question` in a new conversation and gets one reply per text; returns (q, reply ids)."""
    version = ModelRegistry(store).ensure_base_policy("tiny")
    store.ensure_user(user)
    conv = store.create_conversation(user)
    q = store.add_user_message(conv, user, question)
    finish = finish or ["stop"] * len(texts)
    return q, [store.add_reply(conv, user, q, t, Reply(version.id, finish_reason=f)) for t, f in zip(texts, finish)]


def pairs(export):
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in export.rows]


def mark_finished(store, message_id, finish_reason):
    """Rewrite a stored reply's finish_reason: feedback stored before the store refused such replies."""
    with store.transaction() as db:
        db.execute("UPDATE messages SET finish_reason = ? WHERE id = ?", [finish_reason, message_id])


# -- identical texts ------------------------------------------------------------------------------
def test_a_temperature_0_ranking_gives_only_its_distinct_texts(store):
    # Rank at temperature 0: three of four replies say the same, one with a trailing newline.
    _, (p1, lyon, p2, p3) = ask(store, "alice", ["Paris.", "Lyon.", "Paris.\n", " Paris."])
    store.record_ranking("alice", [p1, lyon, p2, p3])
    out = export_preferences(store)
    # C(4,2) = 6 votes: Paris > Lyon once; Paris vs Paris three times; Lyon > "Paris" twice,
    # which repeats the better-ranked Paris and adds nothing.
    assert pairs(out) == [("Paris.", "Lyon.")]
    assert out.dropped == {"identical_texts": 5}
    (group,), _ = export_preference_groups(store)
    assert (group.completions, group.completion_ids, group.pairs) == (["Paris.", "Lyon."], [p1, lyon], [(0, 1)])


def test_a_comparison_of_identical_texts_is_dropped(store):
    _, (a, b) = ask(store, "alice", ["Paris is the capital.", "  Paris is the capital. "])
    store.record_comparison("alice", a, b, "A")
    out = export_preferences(store)
    assert out.rows == [] and out.dropped == {"identical_texts": 1}


def test_an_empty_reply_gives_no_pair(store):
    _, (a, empty) = ask(store, "alice", ["Paris.", "  "])
    store.record_comparison("alice", a, empty, "A")
    out = export_preferences(store)
    assert out.rows == [] and out.dropped == {"empty_text": 1}


# -- failed and stopped replies -------------------------------------------------------------------
def test_feedback_on_failed_or_stopped_replies_stored_earlier_is_skipped(store):
    _, (paris, lyon, nice, rome) = ask(store, "alice", ["Paris.", "Lyon.", "Nice.", "Rome."])
    store.record_comparison("alice", paris, lyon, "A")
    store.record_ranking("alice", [paris, nice, rome])
    store.record_rating("alice", paris, 1)
    store.record_rating("alice", rome, -1)
    store.record_demonstration("alice", store.message(nice)["parent_id"], "The capital is Paris.",
                               replaces_message_id=nice)
    mark_finished(store, lyon, "error")
    mark_finished(store, nice, "abort")
    out = export_preferences(store)
    # kept: Paris > Rome, from the ranking and again from the thumbs (the later, thumbs, vote counts)
    assert pairs(out) == [("Paris.", "Rome.")]
    assert export_preference_groups(store)[0][0].sources == ["thumbs"]
    # dropped: Paris > Lyon (error); Paris > Nice and Nice > Rome (abort); the demonstration over Nice
    assert out.dropped == {"failed_or_stopped_reply": 4, "superseded_by_same_user": 1}
    mark_finished(store, paris, "abort")
    assert export_thumbs(store).dropped == {"failed_or_stopped_reply": 1}
    assert [r["completion"][0]["content"] for r in export_thumbs(store).rows] == ["Rome."]
    sft = export_sft(store, include_thumbs_up=True)
    assert [r["messages"][-1]["content"] for r in sft.rows] == ["The capital is Paris."]
    assert sft.dropped == {"failed_or_stopped_reply": 1}


def test_replies_cut_at_max_tokens_are_real_replies(store):
    _, (cut, short) = ask(store, "alice", ["Paris is the capital and largest", "Paris."], finish=["length", "stop"])
    store.record_comparison("alice", short, cut, "A")
    assert pairs(export_preferences(store)) == [("Paris.", "Paris is the capital and largest")]


# -- one user's changed vote ----------------------------------------------------------------------
def test_a_users_latest_vote_on_a_pair_wins_in_either_order(store):
    _, (paris, lyon, nice) = ask(store, "alice", ["Paris.", "Lyon.", "Nice."])
    store.record_ranking("alice", [lyon, paris, nice])  # Lyon > Paris, Lyon > Nice, Paris > Nice
    store.record_comparison("alice", lyon, paris, "B")  # changed her mind: Paris > Lyon
    out = export_preferences(store)
    assert pairs(out) == [("Lyon.", "Nice."), ("Paris.", "Nice."), ("Paris.", "Lyon.")]
    assert out.dropped == {"superseded_by_same_user": 1}


def test_a_later_tie_withdraws_a_users_vote(store):
    _, (paris, lyon) = ask(store, "alice", ["Paris.", "Lyon."])
    store.record_comparison("alice", paris, lyon, "A")
    store.record_comparison("alice", lyon, paris, "tie")
    out = export_preferences(store)
    assert out.rows == [] and out.dropped == {"superseded_by_same_user": 1}
    store.record_comparison("alice", lyon, paris, "B")
    out = export_preferences(store)
    assert pairs(out) == [("Paris.", "Lyon.")] and out.dropped == {"superseded_by_same_user": 1}


def test_a_users_changed_thumbs_give_the_pair_of_their_latest_ratings(store):
    _, (paris, lyon) = ask(store, "alice", ["Paris.", "Lyon."])
    store.record_rating("alice", paris, -1)
    store.record_rating("alice", lyon, 1)
    assert pairs(export_preferences(store)) == [("Lyon.", "Paris.")]
    store.record_rating("alice", paris, 1)
    store.record_rating("alice", lyon, -1)
    out = export_preferences(store)
    assert pairs(out) == [("Paris.", "Lyon.")] and out.dropped == {}  # older ratings make no vote at all
    store.record_rating("alice", lyon, 0)  # cleared: no thumbs pair
    assert export_preferences(store).rows == []


# -- several users ------------------------------------------------------------------------------
def vote(store, user, order):
    """`user` asks the question, gets the texts of `order` as replies, and ranks them in that order."""
    _, ids = ask(store, user, order)
    store.record_ranking(user, ids)


def test_the_majority_of_users_decides_and_is_exported_once(store):
    vote(store, "alice", ["Paris.", "Lyon."])
    vote(store, "bob", ["Paris.", "Lyon."])
    vote(store, "carol", ["Lyon.", "Paris."])
    out = export_preferences(store)
    assert pairs(out) == [("Paris.", "Lyon.")]
    assert out.dropped == {"duplicate_vote": 1, "outvoted": 1}
    (group,), _ = export_preference_groups(store)
    assert len(group.completions) == 2 and group.pairs == [(0, 1)]


def test_a_tie_between_users_drops_the_pair(store):
    vote(store, "alice", ["Paris.", "Lyon.", "Rome."])
    vote(store, "bob", ["Lyon.", "Paris.", "Rome."])
    out = export_preferences(store)
    # each kept row is the latest vote for it: bob's, in his ranking's order
    assert pairs(out) == [("Lyon.", "Rome."), ("Paris.", "Rome.")]
    assert out.dropped == {"duplicate_vote": 2, "tied_across_users": 2}


def test_a_changed_vote_can_turn_the_majority(store):
    vote(store, "alice", ["Paris.", "Lyon."])
    _, (paris, lyon) = ask(store, "bob", ["Paris.", "Lyon."])
    store.record_comparison("bob", paris, lyon, "A")
    vote(store, "carol", ["Lyon.", "Paris."])
    assert pairs(export_preferences(store)) == [("Paris.", "Lyon.")]
    store.record_comparison("bob", paris, lyon, "B")  # bob changes his mind: 2 to 1 for Lyon
    out = export_preferences(store)
    assert pairs(out) == [("Lyon.", "Paris.")]
    assert out.dropped == {"superseded_by_same_user": 1, "duplicate_vote": 1, "outvoted": 1}


def test_the_same_words_in_another_prompt_are_another_pair(store):
    vote(store, "alice", ["Paris.", "Lyon."])
    _, ids = ask(store, "bob", ["Lyon.", "Paris."], question="Which city is in the Rhône valley?")
    store.record_ranking("bob", ids)
    out = export_preferences(store)
    assert pairs(out) == [("Paris.", "Lyon."), ("Lyon.", "Paris.")] and out.dropped == {}
    assert [g.prompt[-1]["content"] for g in export_preference_groups(store)[0]] == [
        QUESTION, "Which city is in the Rhône valley?"]


# -- a better reply ------------------------------------------------------------------------------
def test_a_better_reply_beats_the_reply_it_replaced(store):
    q, (lyon,) = ask(store, "alice", ["Lyon."])
    store.record_demonstration("alice", q, "Paris is the capital of France.", replaces_message_id=lyon)
    store.record_demonstration("alice", q, "Paris.")  # replaces nothing: SFT only
    out = export_preferences(store)
    assert pairs(out) == [("Paris is the capital of France.", "Lyon.")] and out.dropped == {}
    (group,), _ = export_preference_groups(store)
    assert (group.completions, group.completion_ids, group.sources) == (
        ["Paris is the capital of France.", "Lyon."], [None, lyon], ["demonstration"])
    assert len(export_sft(store).rows) == 2


def test_a_better_reply_that_only_repeats_the_reply_gives_no_pair(store):
    q, (paris,) = ask(store, "alice", ["Paris."])
    store.record_demonstration("alice", q, "Paris. ", replaces_message_id=paris)
    out = export_preferences(store)
    assert out.rows == [] and out.dropped == {"identical_texts": 1}


def test_a_better_reply_for_a_stopped_reply_trains_sft_but_gives_no_pair(store):
    q, (stopped,) = ask(store, "alice", ["Par"], finish=["abort"])
    store.record_demonstration("alice", q, "Paris.", replaces_message_id=stopped)
    assert export_preferences(store).dropped == {"failed_or_stopped_reply": 1}
    assert export_sft(store).rows[0]["messages"][-1]["content"] == "Paris."


# -- the thumbs (KTO) export -------------------------------------------------------------------
def test_thumbs_export_gives_one_kto_row_per_reply_with_its_latest_label(store):
    _, (paris, lyon, rome, nice) = ask(store, "alice", ["Paris.", "Lyon.", "Rome.", "Nice."])
    store.record_rating("alice", paris, 1)
    store.record_rating("alice", lyon, 1)
    store.record_rating("alice", rome, 1)
    store.record_rating("alice", lyon, -1)  # changed: Lyon is down
    store.record_rating("alice", rome, 0)  # cleared
    out = export_thumbs(store)
    prompt = [{"role": "user", "content": QUESTION}]
    assert out.rows == [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "Paris."}], "label": True, "ended": True},
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "Lyon."}], "label": False, "ended": True},
    ]
    assert out.dropped == {"superseded_by_same_user": 2, "cleared": 1}
    assert nice  # never rated: no row, nothing dropped


def test_thumbs_export_of_plain_text_prompts_is_strings(store):
    import_rows(store, [{"prompt": "Say hi", "completion": "Hi!"}], "sft", source="seed")
    q = store.db.execute("SELECT id FROM messages WHERE role = 'user'").fetchone()[0]
    importer = store.message(q)["user_id"]
    reply = store.add_reply(store.message(q)["conversation_id"], importer, q, "Go away.",
                            Reply(ModelRegistry(store).ensure_base_policy("tiny").id))
    store.record_rating(importer, reply, -1)
    assert export_thumbs(store).rows == [{"prompt": "Say hi", "completion": "Go away.", "label": False, "ended": True}]


def test_a_reply_cut_off_at_the_token_limit_is_exported_as_not_ended(store):
    """The reward model must read such a reply without a stop token, as PPO's scorer reads a rollout cut at its
    limit: the exports say which replies the server cut (finish_reason "length")."""
    _, (paris, cut) = ask(store, "alice", ["Paris.", "Paris is the capital and the largest city of"],
                          finish=["stop", "length"])
    store.record_ranking("alice", [paris, cut])
    store.record_rating("alice", cut, -1)
    (group,) = export_preference_groups(store)[0]
    assert group.completions == ["Paris.", "Paris is the capital and the largest city of"]
    assert group.ended == [True, False]
    assert [row["ended"] for row in export_thumbs(store).rows] == [False]
    (row,) = export_preferences(store, fmt="groups").rows
    assert row["ended"] == [True, False]
    (trl,) = export_preferences(store).rows
    assert trl["rejected_ended"] is False and "chosen_ended" not in trl  # absent: ended, as in TRL's own rows
    # As an SFT target (a liked reply) it would teach stopping mid-sentence: left out, and said so.
    store.record_rating("alice", cut, 1)
    store.record_rating("alice", paris, 1)
    sft = export_sft(store, include_thumbs_up=True)
    assert [r["messages"][-1]["content"] for r in sft.rows] == ["Paris."]
    assert sft.dropped == {"cut_off_reply": 1}


# -- every vote accounted for; the same snapshot, the same bytes ---------------------------------
def test_snapshot_gives_the_same_bytes_after_more_feedback(store):
    _, (paris, lyon, rome) = ask(store, "alice", ["Paris.", "Lyon.", "Rome."])
    store.record_ranking("alice", [paris, rome, lyon])
    store.record_rating("alice", lyon, -1)
    vote(store, "bob", ["Lyon.", "Paris."])
    snap = store.snapshot()

    def dump(snapshot):
        exports = [export_preferences(store, snapshot), export_preferences(store, snapshot, fmt="groups"),
                   export_thumbs(store, snapshot)]
        return [json.dumps([e.rows, e.dropped], ensure_ascii=False) for e in exports]

    before = dump(snap)
    store.record_comparison("alice", lyon, paris, "A")
    vote(store, "carol", ["Lyon.", "Paris."])
    store.record_rating("alice", lyon, 1)
    assert dump(snap) == before
    assert dump(None) != before


def _random_feedback(store, rng, users, texts):
    """Random votes of `users` on replies drawn from `texts` (repeats included) to QUESTION."""
    for _ in range(rng.randint(3, 12)):
        user = rng.choice(users)
        _, ids = ask(store, user, [rng.choice(texts) for _ in range(rng.randint(2, 5))])
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.4:
                a, b = rng.sample(ids, 2)
                store.record_comparison(user, a, b, rng.choice(["A", "B", "A", "B", "tie", "both_bad"]))
            elif kind < 0.6:
                store.record_ranking(user, rng.sample(ids, rng.randint(2, len(ids))))
            elif kind < 0.9:
                store.record_rating(user, rng.choice(ids), rng.choice([1, -1, 1, -1, 0]))
            else:
                q = store.message(ids[0])["parent_id"]
                store.record_demonstration(user, q, rng.choice([t for t in texts if t.strip()]),
                                           replaces_message_id=rng.choice(ids))
        if rng.random() < 0.2:
            mark_finished(store, rng.choice(ids), rng.choice(["error", "abort"]))


@pytest.mark.parametrize("seed", range(25))
def test_random_feedback_exports_clean_pairs_and_accounts_for_every_vote(tmp_path, seed):
    """A seeded-random property test (hypothesis is not installed in .venv)."""
    rng = random.Random(seed)
    with FeedbackStore(tmp_path / "feedback.db") as store:
        _random_feedback(store, rng, ["alice", "bob", "carol"], ["Paris.", "Paris. ", "Lyon.", "Rome.", " "])
        out = export_preferences(store)
        keys = Counter()
        for r in out.rows:
            chosen, rejected = r["chosen"][0]["content"].strip(), r["rejected"][0]["content"].strip()
            assert chosen and rejected and chosen != rejected
            keys[frozenset((chosen, rejected))] += 1
        assert all(n == 1 for n in keys.values())  # no duplicate, no pair together with its reverse
        assert set(out.dropped) <= set(DROP_REASONS)
        votes = [v for v in _votes(store, out.snapshot, include_thumbs=True) if not v.abstain]
        assert len(out.rows) + sum(out.dropped.values()) == len(votes)
        groups = export_preferences(store, fmt="groups").rows
        assert sum(len(g["pairs"]) for g in groups) == len(out.rows)
        thumbs = export_thumbs(store)
        assert len(thumbs.rows) + sum(thumbs.dropped.values()) == store.db["ratings"].count
        assert all(r["completion"][0]["content"].strip() for r in thumbs.rows)
        # what the export writes, the import takes back
        if out.rows:
            with FeedbackStore(tmp_path / "again.db") as again:
                import_rows(again, out.rows, "preferences", source="export")
                assert sorted(map(json.dumps, export_preferences(again).rows)) == sorted(map(json.dumps, out.rows))


@pytest.mark.parametrize("seed", range(25))
def test_random_comparisons_match_a_per_user_last_vote_majority(tmp_path, seed):
    """Comparisons only, checked against a direct reading of the rules (seeded random, no hypothesis)."""
    rng = random.Random(1000 + seed)
    texts = ["Paris.", "Lyon.", "Rome.", "Nice."]
    last: dict[tuple[str, frozenset[str]], str | None] = {}  # (user, pair) -> preferred text; None: tie
    with FeedbackStore(tmp_path / "feedback.db") as store:
        for user in ["alice", "bob", "carol", "dave"]:
            _, ids = ask(store, user, texts)
            for _ in range(rng.randint(1, 8)):
                i, j = rng.sample(range(4), 2)
                choice = rng.choice(["A", "B", "tie"])
                store.record_comparison(user, ids[i], ids[j], choice)
                last[(user, frozenset((texts[i], texts[j])))] = {"A": texts[i], "B": texts[j]}.get(choice)
        tally: dict[frozenset[str], Counter[str]] = defaultdict(Counter)
        for (_, pair), winner in last.items():
            if winner is not None:
                tally[pair][winner] += 1
        expected = set()
        for pair, counts in tally.items():
            (a, na), (b, nb) = (list(counts.items()) + [(None, 0)])[:2]
            if na != nb:
                winner = a if na > nb else b
                expected.add((winner, next(iter(pair - {winner}))))
        assert set(pairs(export_preferences(store))) == expected
