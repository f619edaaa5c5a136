"""A round's data: the starter set, and the stable split of prompts into training and held-out.

A prompt's side is decided by a hash of its text (``heldout_bucket``), the same in every round:
no reward model or policy ever trains on a held-out prompt, and a prompt never changes side as
feedback grows, so rounds are judged on prompts no earlier round trained on either.
"""

from __future__ import annotations

import hashlib
import json
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


def heldout_bucket(prompt: Any) -> float:
    """A prompt's place in [0, 1) from a hash of its text: below ``heldout_fraction`` it is held out."""
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return int(digest[:8], 16) / 0x100000000


def split_heldout(rows: list[dict[str, Any]], heldout_fraction: float, *, min_heldout: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows by their ``prompt``'s hash, so a prompt's side never changes between
    rounds: no reward model or policy ever trains on a held-out prompt. ``min_heldout`` rows are held
    out at least (those with the smallest hashes), as long as one row is left to train on."""
    ranked = sorted(rows, key=lambda r: heldout_bucket(r["prompt"]))
    n = sum(1 for r in ranked if heldout_bucket(r["prompt"]) < heldout_fraction)
    n = max(n, min(min_heldout, len(rows) - 1))
    held = {id(r) for r in ranked[:n]}
    return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]


def pair_count(groups: list[dict[str, Any]]) -> int:
    """Preference pairs in feedback_db's groups ({'prompt', 'completions', 'pairs'})."""
    return sum(len(g["pairs"]) for g in groups)
