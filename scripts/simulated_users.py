"""Simulated users: people with a hidden gold preference who use the running app through gradio_client.

Each user is logged in (``alignloop serve --users``) and does what a person does in a browser:
chat and click 👍/👎 with reasons, write a better reply, rank K replies, vote in Compare. Their
choices follow the gold scorer g (scripts/gold_preferences.py) with Bradley–Terry label noise at
temperature T, the model of human pairwise judgements that InstructGPT's reward loss assumes:

    P(user prefers A over B) = σ((g(A) − g(B)) / T)                 (Bradley & Terry, 1952)
    P(👍)                    = σ((g − threshold) / T)
    a ranking of K replies   ~ Plackett–Luce with weights exp(g / T)   (its K = 2 case is the line above)

T = 0 is a noiseless user; T = ∞ is a user with no preference (every vote a coin flip: ``--null``).

"Write a better reply": a simulated user cannot write. It regenerates the reply ``best_of`` times
in the app and submits the one it likes best (the Plackett–Luce top choice), i.e. best-of-n
selection from what the app produced, not text the policy could never have written. That keeps
the demonstrations honest (no hand-written answers that leak the rule) and is the same signal as
rejection-sampling fine-tuning.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

GoldScorer = Callable[[str, str], float]
ACTIONS = ("chat", "demonstrate", "rank", "compare")


# --------------------------------------------------------------------------- #
# The noise model: the only place where a gold score becomes a (random) choice
# --------------------------------------------------------------------------- #


def preference_probability(score_a: float, score_b: float, temperature: float) -> float:
    """Bradley–Terry: P(A preferred to B) = σ((g_A − g_B) / T); T = 0 is a step, T = ∞ a coin flip."""
    if math.isinf(temperature):
        return 0.5
    diff = score_a - score_b
    if temperature <= 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, diff / temperature))))


def plackett_luce_order(scores: Sequence[float], temperature: float, rng: random.Random) -> list[int]:
    """Indices best first, drawn from Plackett–Luce with weights exp(g / T) (the Gumbel-max trick:
    sort by g / T + Gumbel noise). T = 0 sorts by g (ties at random), T = ∞ is a uniform shuffle."""
    if math.isinf(temperature):
        keys = [rng.random() for _ in scores]
    elif temperature <= 0:
        keys = [s + 1e-9 * rng.random() for s in scores]
    else:
        keys = [s / temperature - math.log(-math.log(max(rng.random(), 1e-300))) for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


@dataclass
class NoiseModel:
    """How a user's gold preference becomes clicks: temperature T and the 👍 threshold."""

    temperature: float
    threshold: float

    def prefers_first(self, score_a: float, score_b: float, rng: random.Random) -> bool:
        return rng.random() < preference_probability(score_a, score_b, self.temperature)

    def thumbs_up(self, score: float, rng: random.Random) -> bool:
        return rng.random() < preference_probability(score, self.threshold, self.temperature)

    def order(self, scores: Sequence[float], rng: random.Random) -> list[int]:
        return plackett_luce_order(scores, self.temperature, rng)


# --------------------------------------------------------------------------- #
# One user, driving the app as its browser would
# --------------------------------------------------------------------------- #


def gold_scores(gold: GoldScorer, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
    """g of each (prompt, reply), through the scorer's ``score_batch`` when it has one."""
    batch = getattr(gold, "score_batch", None)
    if batch is not None:
        return [float(s) for s in batch(list(prompts), list(replies))]
    return [float(gold(p, r)) for p, r in zip(prompts, replies)]


def parse_reveal(text: str) -> tuple[str, str]:
    """The two version names of Compare's reveal: "Thanks! **A** was `x`, **B** was `y`."."""
    names = text.split("`")
    if len(names) < 5:
        raise ValueError(f"unexpected Compare reveal {text!r}")
    return names[1], names[3]


@dataclass
class Action:
    """What one user action did, for the benchmark's counts."""

    kind: str
    user: str
    prompt: str
    thumbs: int = 0  # 1 👍, -1 👎, 0 none
    demonstrations: int = 0
    rankings: int = 0
    compare_votes: int = 0
    chat_turns: int = 0
    versions: tuple[str, str] | None = None  # Compare: (version of A, version of B)
    choice: str | None = None  # Compare: A, B or tie
    gold: tuple[float, float] | None = None  # Compare: the gold scores of A and B (None: identical texts)


@dataclass
class SimulatedUser:
    """A logged-in user of the app with a hidden gold preference. ``sampling`` is the app's
    (system prompt, temperature, top-p, max tokens) settings row, as a browser sends it."""

    name: str
    client: Any  # gradio_client.Client, logged in as `name`
    gold: GoldScorer
    noise: NoiseModel
    rng: random.Random
    sampling: tuple[str, float, float, int]
    best_of: int = 3
    rank_k: int = 4
    reasons: Callable[[str, str], list[str]] | None = None
    edit: Callable[[str, str], str] | None = None  # how the user edits the better reply they save (None: as is)
    log: list[Action] = field(default_factory=list)

    def act(self, kind: str, prompt: str) -> Action:
        """One action of `kind` (chat, demonstrate, rank or compare) on `prompt`, in a new conversation."""
        self.client.reset_session()  # a fresh page: a new conversation (the login stays)
        action = {"chat": self.chat, "demonstrate": self.demonstrate, "rank": self.rank,
                  "compare": self.compare}[kind](prompt)
        self.log.append(action)
        return action

    def _send(self, prompt: str) -> list[dict]:
        outputs = self.client.predict(prompt, [], *self.sampling, api_name="/chat")
        return list(outputs[1])

    def _like(self, index: int, liked: bool) -> None:
        """Click 👍/👎 under message `index`. gradio_client cannot attach a click's event data
        (gr.LikeData), so this sends the request the browser sends, on the client's own session."""
        fn_index = self.client._infer_fn_index("/like", None)
        endpoint = self.client.endpoints[fn_index]
        endpoint.make_predict(self.client.new_helper(fn_index))(
            *endpoint.insert_empty_state(), event_data={"index": index, "value": "", "liked": liked})

    def chat(self, prompt: str) -> Action:
        """Ask, read the reply, click 👍 or 👎 and save reasons for it."""
        reply = _text(self._send(prompt)[-1])
        score = gold_scores(self.gold, [prompt], [reply])[0]
        liked = self.noise.thumbs_up(score, self.rng)
        self._like(1, liked)
        reasons = ["helpful"] if liked else (self.reasons(prompt, reply) if self.reasons else ["unhelpful"])
        self.client.predict(reasons, "", api_name="/feedback")
        return Action("chat", self.name, prompt, thumbs=1 if liked else -1, chat_turns=1)

    def demonstrate(self, prompt: str) -> Action:
        """Ask, regenerate until `best_of` replies were seen, and save the preferred one as the better reply."""
        history = self._send(prompt)
        replies = [_text(history[-1])]
        for _ in range(self.best_of - 1):
            history = list(self.client.predict(history, *self.sampling, api_name="/regenerate")[0])
            replies.append(_text(history[-1]))
        best = replies[self.noise.order(gold_scores(self.gold, [prompt] * len(replies), replies), self.rng)[0]]
        if self.edit is not None:  # written as this user likes it, not only picked
            best = self.edit(prompt, best)
        # A NUL (a random model emits any token) is invisible in the text box, and the app refuses it
        # ("remove it and try again", feedback_db.validation): a person's edited copy would not hold one.
        best = best.replace("\x00", "")
        if not best.strip():  # the app refuses an empty demonstration; a person would not save one either
            return Action("demonstrate", self.name, prompt, chat_turns=1)
        self.client.predict(best, api_name="/demonstrate")
        return Action("demonstrate", self.name, prompt, demonstrations=1, chat_turns=1)

    def rank(self, prompt: str) -> Action:
        """Get K replies in the Rank tab and give each its rank (1 = best)."""
        outputs = self.client.predict(prompt, self.rank_k, *self.sampling, api_name="/rank")
        texts = rank_texts(outputs, self.rank_k)
        order = self.noise.order(gold_scores(self.gold, [prompt] * len(texts), texts), self.rng)
        positions: list[str | None] = [None] * 9
        for place, index in enumerate(order):
            positions[index] = str(place + 1)
        self.client.predict(*positions, api_name="/submit_ranking")
        return Action("rank", self.name, prompt, rankings=1)

    def compare(self, prompt: str) -> Action:
        """Two anonymous replies side by side; vote for the preferred one (Tie when the texts are identical)."""
        outputs = self.client.predict(prompt, *self.sampling, api_name="/compare")
        a, b = str(outputs[0]), str(outputs[1])
        gold = None
        if a.strip() == b.strip():
            choice = "tie"
        else:
            score_a, score_b = gold_scores(self.gold, [prompt, prompt], [a, b])
            choice = "A" if self.noise.prefers_first(score_a, score_b, self.rng) else "B"
            gold = (score_a, score_b)
        reveal = self.client.predict(api_name=f"/vote_{choice}")
        reveal = reveal if isinstance(reveal, str) else next(o for o in reveal if isinstance(o, str))
        return Action("compare", self.name, prompt, compare_votes=1, versions=parse_reveal(reveal), choice=choice,
                      gold=gold)


def _text(message: Any) -> str:
    content = message["content"] if isinstance(message, dict) else message
    if isinstance(content, list):  # Gradio 6 may send a message's content as parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def rank_texts(outputs: Sequence[Any], k: int) -> list[str]:
    """The K reply texts of /rank's outputs: [result, 9 reply boxes, 9 rank dropdowns] (gr.State
    outputs and layout rows are not sent to API clients)."""
    texts = [_text(b) for b in list(outputs)[1:1 + k]]
    if len(outputs) != 19 or not all(isinstance(b, str) for b in list(outputs)[1:1 + k]):
        raise ValueError(f"/rank returned {len(outputs)} outputs; expected the result, 9 replies and 9 ranks.")
    return texts


def mix_weights(spec: str) -> dict[str, float]:
    """'chat:3,rank:2' → {'chat': 3.0, 'rank': 2.0}; every name must be one of ACTIONS."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition(":")
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r} in the action mix; use {', '.join(ACTIONS)}.")
        weights[name] = float(weight or 1)
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"the action mix {spec!r} has no action with a positive weight.")
    return weights


def plan_actions(weights: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """`n` actions drawn from the mix; every action with a weight appears at least once when n allows."""
    kinds = [k for k, w in weights.items() if w > 0]
    plan = kinds[:n] + rng.choices(kinds, [weights[k] for k in kinds], k=max(0, n - len(kinds)))
    rng.shuffle(plan)
    return plan
