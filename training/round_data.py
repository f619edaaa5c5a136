"""A round's data: the starter set, and the stable split of prompts into training and held-out.

A prompt's side is decided by a hash of its text (``heldout_bucket``), the same in every round:
no reward model or policy ever trains on a held-out prompt, and a prompt never changes side as
feedback grows, so rounds are judged on prompts no earlier round trained on either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTER_DIR = Path(__file__).parent / "starter"
STARTER_FILES = {"sft": "demonstrations.jsonl", "preferences": "preferences.jsonl", "prompts": "prompts.jsonl"}
STARTER_SOURCE = "starter"


def starter_rows(kind: str) -> list[dict[str, Any]]:
    """The starter set's rows of ``kind`` (sft, preferences or prompts)."""
    from feedback_db import read_jsonl

    return list(read_jsonl(STARTER_DIR / STARTER_FILES[kind]))


def seed_starter_set(store: Any) -> dict[str, int]:
    """Import the starter demonstrations, prompts and preference pairs (source 'starter').

    Repeating it adds nothing (imports are keyed by content). Returns new records per kind.
    """
    from feedback_db import import_rows

    return {kind: import_rows(store, starter_rows(kind), kind, source=STARTER_SOURCE).new_records
            for kind in ("sft", "prompts", "preferences")}


def fixed_report_prompts(n: int) -> list[Any]:
    """The first ``n`` starter prompts: every round's report answers the same ones."""
    return [row["prompt"] for row in starter_rows("prompts")[:n]]


def prompt_key(prompt: Any) -> str:
    """A prompt (text or messages) as one canonical string, to compare prompts across exports."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def heldout_bucket(prompt: Any, salt: str = "") -> float:
    """A prompt's place in [0, 1) from a hash of its text: below ``heldout_fraction`` it is held out.

    A different ``salt`` gives an independent split of the same prompts (the judge's half).
    """
    digest = hashlib.sha256((salt + prompt_key(prompt)).encode()).hexdigest()
    return int(digest[:8], 16) / 0x100000000


def heldout_keys(rows: list[dict[str, Any]], fraction: float, *, min_heldout: int = 0, salt: str = "") -> set[str]:
    """The prompt keys of ``rows`` whose bucket is below ``fraction``; at least ``min_heldout`` rows'
    prompts (those with the smallest buckets), and never every row: one is always left outside."""
    ranked = sorted(rows, key=lambda r: heldout_bucket(r["prompt"], salt))
    n = sum(1 for r in ranked if heldout_bucket(r["prompt"], salt) < fraction)
    n = min(max(n, min_heldout), len(rows) - 1)
    return {prompt_key(r["prompt"]) for r in ranked[:n]}


def split_by_keys(rows: list[dict[str, Any]], keys: set[str]) -> tuple[list[dict], list[dict]]:
    """(rows whose prompt is not in ``keys``, rows whose prompt is), each in their original order."""
    inside = [prompt_key(r["prompt"]) in keys for r in rows]
    return [r for r, x in zip(rows, inside) if not x], [r for r, x in zip(rows, inside) if x]


def split_heldout(rows: list[dict[str, Any]], heldout_fraction: float, *, min_heldout: int = 0,
                  salt: str = "") -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows by their ``prompt``'s hash, so a prompt's side never changes between
    rounds: no reward model or policy ever trains on a held-out prompt. ``min_heldout`` rows are held
    out at least (those with the smallest hashes), and one row is always left to train on."""
    return split_by_keys(rows, heldout_keys(rows, heldout_fraction, min_heldout=min_heldout, salt=salt))


def pair_count(groups: list[dict[str, Any]]) -> int:
    """Preference pairs in feedback_db's groups ({'prompt', 'completions', 'pairs'})."""
    return sum(len(g["pairs"]) for g in groups)


# --------------------------------------------------------------------------- #
# The round's snapshot
# --------------------------------------------------------------------------- #


@dataclass
class RoundData:
    """Everything a round trains and judges on, exported at one snapshot and split once.

    Held-out prompts are the same for every kind of row: a prompt held out of the reward
    model's pairs is held out of PPO's prompts and of the thumbs too.
    """

    sft: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    thumbs: list[dict[str, Any]]
    train_groups: list[dict[str, Any]]
    held_groups: list[dict[str, Any]]
    train_prompts: list[dict[str, Any]]
    held_prompts: list[dict[str, Any]]
    train_thumbs: list[dict[str, Any]]

    def counts(self) -> dict[str, int]:
        """Row counts for the round's metrics."""
        return {"demonstrations": len(self.sft), "preference_groups": len(self.groups),
                "preference_pairs": pair_count(self.groups), "prompts": len(self.prompts),
                "train_prompts": len(self.train_prompts), "heldout_prompts": len(self.held_prompts),
                "heldout_preference_groups": len(self.held_groups), "thumbs": len(self.thumbs),
                "train_thumbs": len(self.train_thumbs)}

    def eval_prompts(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` held-out PPO prompts, the same ones every round (smallest hash first)."""
        return sorted(self.held_prompts, key=lambda r: heldout_bucket(r["prompt"]))[:n]


def snapshot_data(store: Any, snapshot: int, heldout_fraction: float, *, thumbs: bool = True) -> RoundData:
    """Export demonstrations, preference groups, PPO prompts and thumbs at ``snapshot``, and split
    them by prompt hash into training and held-out.

    Each 👍/👎 is used once: with ``thumbs`` as its own row (TRL KTO: prompt, completion, label),
    else folded into preference pairs (a 👍 and a 👎 reply to the same message make a pair).
    At least one preference group is held out, so a reward model can always be judged on something.
    """
    from feedback_db import export_ppo_prompts, export_preferences, export_sft, export_thumbs

    sft = export_sft(store, snapshot).rows
    groups = export_preferences(store, snapshot, fmt="groups", include_thumbs=not thumbs).rows
    prompts = export_ppo_prompts(store, snapshot).rows
    thumbs_rows = export_thumbs(store, snapshot).rows if thumbs else []
    held = (heldout_keys(groups, heldout_fraction, min_heldout=1) | heldout_keys(prompts, heldout_fraction)
            | heldout_keys(thumbs_rows, heldout_fraction))
    train_groups, held_groups = split_by_keys(groups, held)
    train_prompts, held_prompts = split_by_keys(prompts, held)
    train_thumbs, _ = split_by_keys(thumbs_rows, held)
    return RoundData(sft, groups, prompts, thumbs_rows, train_groups, held_groups, train_prompts, held_prompts,
                     train_thumbs)


# --------------------------------------------------------------------------- #
# The judge's half
# --------------------------------------------------------------------------- #

JUDGE_SALT = "judge"


@dataclass
class JudgeSplit:
    """Training rows split by prompt between the PPO proxy reward model and the judge: no prompt on both sides."""

    proxy_groups: list[dict[str, Any]]
    judge_groups: list[dict[str, Any]]
    proxy_thumbs: list[dict[str, Any]]
    judge_thumbs: list[dict[str, Any]]


def judge_split(groups: list[dict[str, Any]], thumbs: list[dict[str, Any]] | None = None) -> JudgeSplit:
    """Split training preference groups (and thumbs) in two halves by a second, independent prompt hash.

    Each half has at least one group when there are two or more; thumbs on a prompt go to the
    side of that prompt's groups, others by the same hash.
    """
    thumbs = thumbs or []
    keys = heldout_keys(groups, 0.5, min_heldout=1, salt=JUDGE_SALT)
    group_keys = {prompt_key(g["prompt"]) for g in groups}
    keys |= {prompt_key(t["prompt"]) for t in thumbs
             if prompt_key(t["prompt"]) not in group_keys and heldout_bucket(t["prompt"], JUDGE_SALT) < 0.5}
    proxy_groups, judge_groups = split_by_keys(groups, keys)
    proxy_thumbs, judge_thumbs = split_by_keys(thumbs, keys)
    return JudgeSplit(proxy_groups, judge_groups, proxy_thumbs, judge_thumbs)
