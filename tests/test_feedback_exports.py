"""Exports for training (SFT, preferences, PPO prompts), snapshots, and TRL-format imports."""

from __future__ import annotations

import gzip
import json
from itertools import combinations

import pytest

from feedback_db import (
    FeedbackStore,
    InvalidInputError,
    ModelRegistry,
    Reply,
    export_ppo_prompts,
    export_preference_groups,
    export_preferences,
    export_sft,
    import_jsonl,
    import_rows,
    write_jsonl,
)
from training.metrics_log import read_metrics  # the other reader of JSON lines


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        yield s


def _replies(store, user, conv, q, texts):
    version = ModelRegistry(store).ensure_base_policy("tiny")
    return [store.add_reply(conv, user, q, t, Reply(version.id)) for t in texts]


@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_ranking_expands_to_all_ck2_ordered_pairs(store, k):
    u = store.ensure_user("u")
    conv = store.create_conversation(u)
    q = store.add_user_message(conv, u, "Rank us")
    ids = _replies(store, u, conv, q, [f"reply {i}" for i in range(k)])
    order = list(reversed(ids))  # best first
    store.record_ranking(u, order)
    rows = export_preferences(store).rows
    assert len(rows) == k * (k - 1) // 2
    texts = {m: f"reply {ids.index(m)}" for m in ids}
    expected = [(texts[w], texts[lo]) for w, lo in combinations(order, 2)]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == expected
    (group,) = export_preference_groups(store)[0]
    assert len(group.completions) == k  # each reply once: K forwards, not C(K,2)
    assert len(group.pairs) == k * (k - 1) // 2
    assert [(group.completions[w], group.completions[lo]) for w, lo in group.pairs] == expected


def test_pairs_from_votes_and_thumbs_exclude_ties_and_both_bad(store):
    u = store.ensure_user("u")
    conv = store.create_conversation(u, system_prompt="Be kind.")
    q = store.add_user_message(conv, u, "Hello")
    a, b, c, d = _replies(store, u, conv, q, ["A", "B", "C", "D"])
    store.record_comparison(u, a, b, "B")
    store.record_comparison(u, a, c, "tie")
    store.record_comparison(u, c, d, "both_bad")
    store.record_rating(u, c, 1)
    store.record_rating(u, d, -1)
    store.record_rating(u, a, 1)
    store.record_rating(u, a, 0)  # cleared: the latest rating counts
    rows = export_preferences(store).rows
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert pairs == [("B", "A"), ("C", "D")]
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    assert export_preferences(store, include_thumbs=False).rows == rows[:1]
    groups, _ = export_preference_groups(store)
    assert groups[0].sources == ["comparison", "thumbs"]


def test_thumbs_pairs_need_the_same_context(store):
    u = store.ensure_user("u")
    conv = store.create_conversation(u)
    q1 = store.add_user_message(conv, u, "one")
    (r1,) = _replies(store, u, conv, q1, ["r1"])
    q2 = store.add_user_message(conv, u, "two", parent_id=r1)
    (r2,) = _replies(store, u, conv, q2, ["r2"])
    store.record_rating(u, r1, 1)
    store.record_rating(u, r2, -1)
    assert export_preferences(store).rows == []


def test_snapshot_makes_exports_reproducible(store):
    u = store.ensure_user("u")
    conv = store.create_conversation(u)
    q = store.add_user_message(conv, u, "Hi")
    a, b = _replies(store, u, conv, q, ["a", "b"])
    store.record_comparison(u, a, b, "A")
    store.record_demonstration(u, q, "Hello!")
    snap = store.snapshot()
    first = (export_preferences(store).rows, export_sft(store).rows, export_ppo_prompts(store).rows)
    store.record_comparison(u, a, b, "B")
    store.record_demonstration(u, q, "Hi there!")
    q2 = store.add_user_message(conv, u, "Later question", parent_id=a)
    assert (export_preferences(store, snap).rows, export_sft(store, snap).rows,
            export_ppo_prompts(store, snap).rows) == first
    # the user changed their vote: the latest one counts
    later = export_preferences(store)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in later.rows] == [("b", "a")]
    assert later.dropped == {"superseded_by_same_user": 1}
    assert export_preferences(store, snap).snapshot == snap
    with pytest.raises(InvalidInputError, match="out of range"):
        export_sft(store, store.snapshot() + 10)
    assert q2


def test_sft_export_demonstrations_and_liked_replies(store):
    u = store.ensure_user("u")
    conv = store.create_conversation(u)
    q = store.add_user_message(conv, u, "Name a colour")
    good, bad = _replies(store, u, conv, q, ["Blue.", "Seven."])
    store.record_demonstration(u, q, "Red is a colour.")
    store.record_rating(u, good, 1)
    store.record_rating(u, bad, -1)
    rows = export_sft(store).rows
    assert rows == [{"messages": [{"role": "user", "content": "Name a colour"},
                                  {"role": "assistant", "content": "Red is a colour."}]}]
    rows = export_sft(store, include_thumbs_up=True).rows
    assert [r["messages"][-1]["content"] for r in rows] == ["Red is a colour.", "Blue."]


def test_ppo_prompts_are_user_turns_with_context_deduplicated(store):
    u = store.ensure_user("u")
    for _ in range(2):  # the same first question in two conversations
        conv = store.create_conversation(u)
        q = store.add_user_message(conv, u, "Tell me a joke")
        (a,) = _replies(store, u, conv, q, ["Knock knock."])
    store.add_user_message(conv, u, "Another", parent_id=a)
    rows = export_ppo_prompts(store).rows
    assert rows == [
        {"prompt": [{"role": "user", "content": "Tell me a joke"}]},
        {"prompt": [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "Knock knock."},
                    {"role": "user", "content": "Another"}]},
    ]


TEXT_ROWS = [
    {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "chosen": " Mix flour, water, yeast.", "rejected": " No."},
    {"prompt": "\n\nHuman: Say hi", "chosen": " Hi!", "rejected": " Go away."},
    {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "chosen": " Knead, rise, bake.", "rejected": " No."},
    {"prompt": "\n\nHuman: Say hi", "chosen": " Hi!", "rejected": " Go away."},  # a repeated vote counts once
    {"prompt": "Unicode ✓ — ünïcödé 😀", "chosen": "Yes ✓", "rejected": "Nein ✗", "rejected_ended": False},  # cut off
]
# Exported in the order of the deciding votes: the repeated row 4 supersedes row 2.
TEXT_EXPORT = [TEXT_ROWS[0], TEXT_ROWS[2], TEXT_ROWS[3], TEXT_ROWS[4]]


def test_import_then_export_round_trips_trl_text_rows(store, tmp_path):
    src = tmp_path / "prefs.jsonl"
    write_jsonl(TEXT_ROWS, src)
    result = import_jsonl(store, src, "preferences")
    assert result.rows == 5
    exported = export_preferences(store)
    assert exported.rows == TEXT_EXPORT and exported.dropped == {"superseded_by_same_user": 1}
    # the same prompt became one context: its replies form one group
    groups, _ = export_preference_groups(store)
    bread = next(g for g in groups if "bread" in g.prompt)
    assert sorted(bread.completions) == [" Knead, rise, bake.", " Mix flour, water, yeast.", " No."]
    # re-importing the same file adds nothing
    again = import_jsonl(store, src, "preferences")
    assert again.new_records == 0
    assert export_preferences(store).rows == TEXT_EXPORT
    # imported replies are tied to an external model version
    version = ModelRegistry(store).get("external:prefs")
    assert version.kind == "external"


def test_import_conversational_rows_round_trip_and_gzip(store, tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}],
        }
    ]
    src = tmp_path / "conv.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[0]) + "\n")
    import_jsonl(store, src, "preferences")
    assert export_preferences(store).rows == rows


def test_sft_and_prompt_imports_round_trip(store):
    sft = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
           {"prompt": "Plain prompt", "completion": "Plain answer"}]
    import_rows(store, sft, "sft", source="seed")
    assert export_sft(store).rows == sft
    import_rows(store, [{"prompt": [{"role": "user", "content": "What is RLHF?"}]}], "prompts", source="seed")
    assert {"prompt": [{"role": "user", "content": "What is RLHF?"}]} in export_ppo_prompts(store).rows


@pytest.mark.parametrize(
    "bad_row, match",
    [
        ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
        ({"prompt": "p", "chosen": ["x"], "rejected": "b"}, "must be a string"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}, "assistant"),
        ({"prompt": [{"role": "assistant", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "alternate"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 2: chosen and rejected are the same text"),
        ({"prompt": "p", "chosen": " same\n", "rejected": "same"}, "row 2: chosen and rejected are the same text"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "row 2: 'chosen' is empty"),
        ({"prompt": "p", "chosen": "a", "rejected": " \n\t"}, "row 2: 'rejected' is empty"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "  "}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "row 2: 'chosen' is empty"),
        ({"prompt": [{"role": "user", "content": " "}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "row 2 message 0 is empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "rejected_ended": "no"}, "row 2: 'chosen_ended' and "),
    ],
)
def test_a_bad_row_aborts_the_whole_import(store, bad_row, match):
    rows = [TEXT_ROWS[0], bad_row]
    before = store.snapshot()
    with pytest.raises(InvalidInputError, match=match):
        import_rows(store, rows, "preferences", source="bad")
    assert store.snapshot() == before and store.db["messages"].count == 0


def test_invalid_json_line_reports_its_number(store, tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text(json.dumps(TEXT_ROWS[0]) + "\n{not json\n")
    with pytest.raises(InvalidInputError, match="broken.jsonl:2"):
        import_jsonl(store, src, "preferences")
    assert store.db["messages"].count == 0


@pytest.mark.parametrize("line", [
    '{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}',  # a lone surrogate escape in a value
    '{"prompt": "p\\udfff tail", "chosen": "a", "rejected": "b"}',
    '{"prompt": "p", "chosen": "a", "rejected": "b", "\\ud83d": 1}',  # even in a key the import ignores
])
def test_a_lone_surrogate_is_refused_with_its_line_and_nothing_written(store, tmp_path, line):
    src = tmp_path / "surrogate.jsonl"
    src.write_text(json.dumps(TEXT_ROWS[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"surrogate.jsonl:3 contains an unpaired surrogate"):
        import_jsonl(store, src, "preferences")
    assert store.db["messages"].count == 0 and store.snapshot() == 0
    with pytest.raises(InvalidInputError, match="row 2 contains an unpaired surrogate"):
        import_rows(store, [TEXT_ROWS[0], json.loads(line)], "preferences", source="rows")
    assert store.db["messages"].count == 0


def test_invalid_utf8_bytes_are_refused_with_their_line(store, tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(TEXT_ROWS[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(InvalidInputError, match="latin1.jsonl:2 is not valid UTF-8"):
        import_jsonl(store, src, "preferences")
    assert store.db["messages"].count == 0


def test_an_imported_system_prompt_over_the_limit_names_its_row(store):
    row = {"prompt": [{"role": "system", "content": "s" * 5_000}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(InvalidInputError, match="row 1 message 0 is 5,000 characters; the limit is 4,000"):
        import_rows(store, [row], "preferences")
    assert store.db["messages"].count == 0


def test_jsonl_rows_end_at_newlines_only(store, tmp_path):
    """Text may hold U+0085 and U+2028, which str.splitlines() treats as line ends: a JSONL line must not."""
    user = store.ensure_user("u")
    conv = store.create_conversation(user)
    store.add_user_message(conv, user, "first\x85line\u2028and more")
    store.add_user_message(store.create_conversation(user), user, "second")
    rows = export_ppo_prompts(store).rows
    path = tmp_path / "prompts.jsonl"
    write_jsonl(rows, path)
    assert len(path.read_text(encoding="utf-8").split("\n")[:-1]) == 2
    assert read_metrics(path) == rows
