"""Gold preferences for the simulated users of `scripts/bench_loop.py`: hidden scorers g(prompt, reply) -> float.

A gold scorer is any function ``(prompt: str, reply: str) -> float`` (``--gold package.module:function``);
higher is better. Optional attributes a scorer may carry, which bench_loop uses when present:

* ``threshold``: the score at which a user is equally likely to give 👍 or 👎 (default 0);
* ``score_batch(prompts, replies)``: the same scores for many pairs at once (faster for a model);
* ``prompts()``: the prompts the simulated users write (default: :func:`rule_prompts`);
* ``reasons(prompt, reply)``: the 👎 reasons a user ticks (the app's THUMBS_DOWN_REASONS);
* ``edit(prompt, reply)``: how a user with this preference edits the reply they save as the better one
  (a demonstration is written, not only picked; default: saved as it is).

Two ship here:

(a) :func:`rule_gold`, a transparent rule a 270M model can learn (also what ``--tiny`` uses);
(b) :func:`hh_gold_rm`, a reward model trained with alignloop's own trainer on one part of the
    Anthropic HH-harmless pairs, while the users' prompts come from the other part: the proxy
    (the round's reward model, trained on the users' votes) vs gold setup of Gao et al. (2022),
    "Scaling Laws for Reward Model Overoptimization". :func:`train_hh_gold_rm` trains it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from training.round import heldout_bucket, starter_rows

GoldScorer = Callable[[str, str], float]

# --------------------------------------------------------------------------- #
# (a) The rule: complete + non-repetitive + concise + on topic, each in [0, 1]
# --------------------------------------------------------------------------- #

RULE_MAX_WORDS = 60  # "concise": full marks up to this many words, then a linear decay to 0 at twice as many
RULE_THRESHOLD = 3.0  # of 4: 👍 / 👎 are equally likely at this score (before noise, see simulated_users)
_ENDINGS = (".", "!", "?", '"', "'", ")", "”", "’")
_WORD = re.compile(r"[a-z0-9']+")
STOPWORDS = frozenset(
    "a about after all also am an and any are as at be been before being but by can could did do does doing "
    "for from get give had has have having he her here him his how i if in into is it its just let like me "
    "more most my no not now of on one or our out over please she should so some tell than that the their "
    "them then there these they this those to too up us very was we were what when where which while who "
    "why will with would you your two three four few many much make way ways idea ideas tip tips".split())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ letters that are not stop words (what "on topic" is measured on)."""
    return {w for w in _words(text) if len(w) >= 3 and w not in STOPWORDS}


def rule_components(prompt: str, reply: str, max_words: int = RULE_MAX_WORDS) -> dict[str, float]:
    """The rule's four parts, each in [0, 1]; an empty reply scores 0 on all of them.

    * complete: the reply ends like a sentence (. ! ? or a closing quote/bracket), i.e. not cut off;
    * non_repetitive: 1 - the larger of (repeated word trigrams / trigrams) and (repeated lines / lines);
    * concise: 1 up to ``max_words`` words, then 1 - (words - max_words) / max_words, floored at 0;
    * on_topic: the share of the prompt's content words the reply uses, full marks at 3 (or all of them).
    """
    text = reply.strip()
    words = _words(text)
    if not words:
        return {"complete": 0.0, "non_repetitive": 0.0, "concise": 0.0, "on_topic": 0.0}
    trigrams = list(zip(words, words[1:], words[2:]))
    trigram_rep = (len(trigrams) - len(set(trigrams))) / len(trigrams) if trigrams else 0.0
    lines = [line.strip().lower() for line in text.splitlines() if line.strip()]
    line_rep = (len(lines) - len(set(lines))) / len(lines)
    topic = content_words(prompt)
    hits = len(topic & set(words))
    return {
        "complete": 1.0 if text.endswith(_ENDINGS) else 0.0,
        "non_repetitive": 1.0 - max(trigram_rep, line_rep),
        "concise": max(0.0, 1.0 - max(0, len(words) - max_words) / max_words),
        "on_topic": min(1.0, hits / min(3, len(topic))) if topic else 1.0,
    }


def rule_gold(prompt: str, reply: str) -> float:
    """Gold (a): the sum of :func:`rule_components`, in [0, 4]. A user likes a complete, non-repetitive
    answer of at most 60 words that uses the prompt's own content words."""
    return sum(rule_components(prompt, reply).values())


def rule_reasons(prompt: str, reply: str) -> list[str]:
    """The 👎 reasons the rule explains: which of its parts fell short."""
    parts = rule_components(prompt, reply)
    named = [("cut off", parts["complete"] < 1), ("repetitive", parts["non_repetitive"] < 0.8),
             ("too long", parts["concise"] < 1), ("off topic", parts["on_topic"] < 0.5)]
    return [reason for reason, short in named if short] or ["unhelpful"]


_TEMPLATES = ("How do I {}?", "Give me one tip for {}.", "Explain {} in two sentences.",
              "What should a beginner know about {}?", "Why do people enjoy {}?")
_TOPICS = ("baking bread", "growing tomatoes", "learning the guitar", "saving money", "running a marathon",
           "painting with watercolours", "keeping a diary", "learning Spanish", "repairing a bicycle",
           "brewing coffee", "planting trees", "training a puppy", "writing a poem", "studying history",
           "cooking rice", "swimming laps", "reading novels", "fixing a leaking tap", "camping in winter",
           "photographing birds", "knitting a scarf", "sleeping better", "making pancakes", "public speaking")


def rule_prompts() -> list[str]:
    """The users' prompts for the rule gold: the starter prompts (text ones), then templates x topics.
    bench_loop never evaluates on a starter prompt (round 0 trains on them): its held-out prompts
    come from the templates x topics."""
    starter = [r["prompt"] for r in starter_rows("prompts") if isinstance(r["prompt"], str)]
    return starter + [t.format(topic) for topic in _TOPICS for t in _TEMPLATES]


_SENTENCE_END = re.compile(r"[.!?][\"'”’)]?(?=\s|$)")


def rule_edit(prompt: str, reply: str) -> str:
    """What a user with the rule's taste writes as the better reply, from the best one they saw: a reply
    cut off mid-sentence loses its unfinished last sentence (when a whole sentence is left), as a person
    tidying it up would; a complete reply is saved as it is."""
    text = reply.strip()
    if not text or text.endswith(_ENDINGS):
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends and len(_words(text[:ends[-1]])) >= 3 else text


rule_gold.threshold = RULE_THRESHOLD  # type: ignore[attr-defined]
rule_gold.prompts = rule_prompts  # type: ignore[attr-defined]
rule_gold.reasons = rule_reasons  # type: ignore[attr-defined]
rule_gold.edit = rule_edit  # type: ignore[attr-defined]

# --------------------------------------------------------------------------- #
# (b) A gold reward model on one part of HH-harmless; the users' prompts from the other part
# --------------------------------------------------------------------------- #

GOLD_RM_ENV = "ALIGNLOOP_GOLD_RM"  # folder of the gold reward adapter (written by train_hh_gold_rm)
HH_DATA_ENV = "ALIGNLOOP_HH_DATA"  # the HH pairs (.jsonl.gz with prompt/chosen/rejected)
DEFAULT_HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"
GOLD_SHARE = 0.5  # prompts whose hash bucket is below this train the gold RM; the users get the rest


def hh_data_path() -> Path:
    """$ALIGNLOOP_HH_DATA, else the shared copy next to the repository; an error says how to get it."""
    path = Path(os.environ.get(HH_DATA_ENV, DEFAULT_HH_DATA)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no HH pairs at {path}; set ${HH_DATA_ENV} to a .jsonl.gz of "
                                "{'prompt', 'chosen', 'rejected'} rows (Anthropic hh-rlhf, harmless-base).")
    return path


def hh_rows(path: Path | None = None) -> list[dict[str, Any]]:
    """The HH rows, in file order."""
    with gzip.open(path or hh_data_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def is_gold_part(prompt: str) -> bool:
    """Whether an HH prompt belongs to the gold RM's part (by its hash: fixed, never the users')."""
    return heldout_bucket(["gold", prompt]) < GOLD_SHARE


def first_human_turn(transcript: str) -> str:
    """The opening user message of an HH transcript ("\\n\\nHuman: ... \\n\\nAssistant: ...")."""
    from training.chat_data import to_messages

    return to_messages(transcript)[0]["content"]


def hh_user_prompts() -> list[str]:
    """The users' prompts for the HH gold: the opening messages of the other part's transcripts, each once
    (a user opens a chat with it; the app writes every assistant turn)."""
    seen: dict[str, None] = {}
    for row in hh_rows():
        if not is_gold_part(row["prompt"]):
            seen.setdefault(first_human_turn(row["prompt"]), None)
    return [p for p in seen if p.strip()]


def train_hh_gold_rm(out: Path, *, pairs: int = 400, base_model: str = "default", max_length: int = 384,
                     epochs: float = 1.0, device: str = "auto", seed: int = 0) -> Path:
    """Train the gold reward model on up to ``pairs`` pairs of the gold part; return its adapter folder.

    Uses the project's trainer (``train_reward_model``, 10% of the gold part's prompts held out for its
    own accuracy). On 2 CPU cores it trains at about 0.2-0.9 pairs/s, so 400 pairs take 10-35 minutes.
    """
    from training.config import LoraSettings, RewardConfig
    from training.reward_model import train_reward_model

    rows = [r for r in hh_rows() if is_gold_part(r["prompt"])]
    rows = rows[:pairs] if pairs else rows
    data = Path(out) / "data" / "gold_pairs.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardConfig(base_model=base_model, data=str(data), output_dir=str(Path(out) / "rm"), eval_fraction=0.1,
                       epochs=epochs, groups_per_batch=8, micro_batch_groups=4, max_length=max_length,
                       device=device, seed=seed, progress=False, lora=LoraSettings(r=16, alpha=32))
    result = train_reward_model(cfg)
    (Path(out) / "gold_rm.json").write_text(json.dumps(
        {"adapter": str(result.adapter_dir), "pairs": len(rows), "held_out_accuracy": result.eval_accuracy,
         "held_out_pairs": result.eval_pairs, "train_seconds": result.train_seconds}, indent=2))
    return result.adapter_dir


class _LazyRewardModel:
    """The gold RM, loaded once on first use from $ALIGNLOOP_GOLD_RM; scoring is serialised (user threads)."""

    def __init__(self) -> None:
        self._rm: Any = None
        self._lock = threading.Lock()

    def score(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        with self._lock:
            if self._rm is None:
                folder = os.environ.get(GOLD_RM_ENV, "")
                if not folder or not Path(folder).is_dir():
                    raise RuntimeError(f"hh_gold_rm needs a trained gold reward model: set ${GOLD_RM_ENV} to its "
                                       "folder, or run `python scripts/bench_loop.py --train-gold` first.")
                from training.reward_model import RewardModel

                self._rm = RewardModel.load(folder, device=os.environ.get("ALIGNLOOP_GOLD_DEVICE", "auto"))
            return self._rm.score(list(prompts), list(replies))


_GOLD_RM = _LazyRewardModel()


def hh_gold_rm(prompt: str, reply: str) -> float:
    """Gold (b): the gold reward model's (shifted) score of the reply to a one-turn chat."""
    return _GOLD_RM.score([prompt], [reply])[0]


hh_gold_rm.threshold = 0.0  # type: ignore[attr-defined]  # the RM is shifted: its reference replies average 0
hh_gold_rm.score_batch = _GOLD_RM.score  # type: ignore[attr-defined]
hh_gold_rm.prompts = hh_user_prompts  # type: ignore[attr-defined]
