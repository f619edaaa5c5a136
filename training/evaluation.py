"""Evaluating a round's models, with intervals: their replies (greedy, or as the app samples them), the
candidate judged against live (``judge_candidate``), paired reward gains, RM accuracy.

The statistics every gate reads are written here once:

* ``bootstrap_interval``: percentile bootstrap of a mean (Efron & Tibshirani 1993), used for the
  candidate's reward gain over live (paired per held-out prompt) and for a new reward model's
  accuracy minus the previous one's (paired per held-out pair);
* ``accuracy_interval``: Wilson score interval of a reward model's held-out pairwise accuracy;
* ``is_repetition_loop`` and ``reply_quality``: what a user sees first in a small model's replies
  (loops, replies cut off at the token limit, length), measured before and after round 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from feedback_db import wilson_interval
from training.config import SFTConfig
from training.sampling import GREEDY, ReplySampling

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Estimate:
    """A statistic, its 95% interval and how many units (prompts, pairs) it was computed on.

    ``low``/``high`` are NaN when there is nothing to estimate from (``n == 0``).
    """

    value: float
    low: float
    high: float
    n: int

    @property
    def ci(self) -> list[float]:
        return [self.low, self.high]


def bootstrap_interval(values: Sequence[float], *, confidence: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of ``values`` and its percentile-bootstrap interval (Efron & Tibshirani 1993,
    *An Introduction to the Bootstrap*, ch. 13).

    Draw ``resamples`` samples of size n with replacement, take each one's mean; the interval is
    the (1-confidence)/2 and (1+confidence)/2 quantiles of those means. Deterministic for a given
    ``seed``. The units must be independent: pass one value per prompt (a paired difference), not
    one per token. With n == 1 the interval has zero width (it says nothing); gates therefore
    also demand a minimum n.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 1_000_000 // n)  # bound the index matrix to ~8 MB whatever n is
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(float(x.mean()), float(low), float(high), n)


def accuracy_interval(correct: Sequence[bool], *, confidence: float = CONFIDENCE) -> Estimate:
    """Pairwise accuracy and its Wilson score interval (Wilson 1927; ``feedback_db.wilson_interval``).

    Treats pairs as independent: pairs of one K-wise ranking share replies, so with many pairs
    per prompt the true interval is somewhat wider.
    """
    n = len(correct)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    k = sum(bool(c) for c in correct)
    low, high = wilson_interval(k, n, z=z)
    return Estimate(k / n, low, high, n)


def json_number(x: float | None) -> float | None:
    """None for a missing or NaN number (nothing to estimate from), so metrics stay plain JSON."""
    return None if x is None or math.isnan(x) else x


def paired_gains(candidate: Sequence[float], live: Sequence[float]) -> list[float]:
    """Per-prompt reward of the candidate's reply minus live's reply to the same prompt."""
    if len(candidate) != len(live):
        raise ValueError(f"paired gains need one live score per candidate score ({len(candidate)} != {len(live)}).")
    return [c - lv for c, lv in zip(candidate, live)]


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def pairwise_correct(rm: Any, groups: Sequence[Any]) -> list[bool]:
    """For each preference pair of each group, whether a loaded RewardModel scores the winner
    strictly higher (a tie counts as wrong). Pairs in group order, then pair order."""
    correct: list[bool] = []
    for g in groups:
        scores = rm.score([g.prompt] * len(g.completions), g.completions, g.ended or None)
        correct += [scores[w] > scores[lose] for w, lose in g.pairs]
    return correct


def reward_accuracy(rm: Any, groups: Sequence[Any]) -> float:
    """Pairwise accuracy of a loaded RewardModel on preference groups (ties count as wrong; NaN without pairs)."""
    correct = pairwise_correct(rm, groups)
    return sum(correct) / len(correct) if correct else float("nan")


def greedy_replies(base_model: str, device: str, adapters: dict[str, str | None], prompts: list[Any],
                   max_new_tokens: int, max_prompt_tokens: int = 0) -> dict[str, list[str]]:
    """Greedy replies of each named adapter (None: the bare base) on the same prompts, one base in memory."""
    out = policy_replies(base_model, device, adapters, prompts, max_new_tokens, max_prompt_tokens)
    return {name: [replies[0] for replies in rows] for name, rows in out.texts.items()}


@dataclass
class PolicyReplies:
    """Each version's replies, ``texts[name][prompt][sample]``, and whether each ended with a stop token
    (``ended``, same shape; False: cut off at the token limit)."""

    texts: dict[str, list[list[str]]]
    ended: dict[str, list[list[bool]]]


def policy_replies(base_model: str, device: str, adapters: dict[str, str | None], prompts: list[Any],
                   max_new_tokens: int, max_prompt_tokens: int = 0, sampling: ReplySampling = GREEDY,
                   batch_rows: int = 64) -> PolicyReplies:
    """``sampling.samples`` replies per prompt of each named adapter (None: the bare base), one base in memory.

    ``sampling`` is greedy by default, or e.g. ``training.sampling.APP_SAMPLING`` (what users get from the
    app). Every version draws from the same seeded random stream. ``max_prompt_tokens`` > 0 cuts long
    prompts the way PPO does (``chat_data.encode_prompt_fitted``, oldest turns first); 0 keeps them whole.
    Generation runs in batches of at most ``batch_rows`` replies.
    """
    import torch

    from training.adapters import attach_adapter, load_base, use_adapter
    from training.chat_data import encode_prompt, encode_prompt_fitted, left_pad, pad_token_id, stop_token_ids

    base, tok, dev = load_base(SFTConfig(base_model=base_model, device=device))
    model = base
    for name, folder in adapters.items():
        if folder:
            model = attach_adapter(model, name, folder, None, trainable=False)
    model.eval()
    k = sampling.samples
    encoded = [encode_prompt_fitted(tok, p, max_prompt_tokens) if max_prompt_tokens else encode_prompt(tok, p)
               for p in prompts for _ in range(k)]
    pad = pad_token_id(tok)
    stops = stop_token_ids(tok)
    out = PolicyReplies({}, {})
    for name, folder in adapters.items():
        if folder:
            use_adapter(model, name, set())
        torch.manual_seed(sampling.seed)
        texts: list[str] = []
        ended: list[bool] = []
        for start in range(0, len(encoded), batch_rows):
            ids, mask = left_pad(encoded[start:start + batch_rows], pad)
            kwargs = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                          eos_token_id=stops, pad_token_id=pad, **sampling.generate_options(ids.shape[1]))
            with torch.no_grad():
                if folder or model is base:
                    gen = model.generate(**kwargs)
                else:
                    with model.disable_adapter():
                        gen = model.generate(**kwargs)
            for row in gen[:, ids.shape[1]:].cpu().tolist():
                texts.append(tok.decode(row, skip_special_tokens=True).strip())
                ended.append(any(t in stops for t in row))
        out.texts[name] = [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
        out.ended[name] = [ended[i * k:(i + 1) * k] for i in range(len(prompts))]
    return out


@dataclass
class CandidateJudgement:
    """Candidate vs live on the same prompts: ``replies[side][prompt]`` (one or more each), each scorer's
    ``scores[scorer][side]`` (one per prompt: the mean over its replies) and ``gains[scorer]``, the
    candidate's gain over live paired per prompt, with its bootstrap interval."""

    replies: dict[str, list[list[str]]]
    scores: dict[str, dict[str, list[float]]]
    gains: dict[str, Estimate]


def judge_candidate(base_model: str, device: str, prompts: list[Any], live: str | None, candidate: str,
                    scorers: dict[str, Any], *, max_new_tokens: int, max_prompt_tokens: int = 0,
                    sampling: ReplySampling = GREEDY, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> CandidateJudgement:
    """Replies of live (None: the bare base) and candidate drawn as ``sampling`` says, scored by each reward
    model in ``scorers`` (name -> adapter folder; a reply cut off at the token limit is read without a stop
    token, as in training); per prompt the mean over its replies, so the prompt stays the unit of the paired
    bootstrap."""
    from training.reward_model import RewardModel

    drawn = policy_replies(base_model, device, {"live": live, "candidate": candidate}, prompts, max_new_tokens,
                           max_prompt_tokens, sampling=sampling)
    k = sampling.samples
    each = [p for p in prompts for _ in range(k)]
    scores: dict[str, dict[str, list[float]]] = {}
    gains: dict[str, Estimate] = {}
    for role, folder in scorers.items():
        rm = RewardModel.load(folder, base_model=base_model, device=device) if prompts else None
        scores[role] = {}
        for side in ("live", "candidate"):
            flat = rm.score(each, [r for row in drawn.texts[side] for r in row],
                            [e for row in drawn.ended[side] for e in row]) if rm else []
            scores[role][side] = [sum(flat[i * k:(i + 1) * k]) / k for i in range(len(prompts))] if rm else []
        gains[role] = bootstrap_interval(paired_gains(scores[role]["candidate"], scores[role]["live"]),
                                         resamples=resamples, seed=seed)
        del rm
    return CandidateJudgement(drawn.texts, scores, gains)


# --------------------------------------------------------------------------- #
# Reply quality a user notices first
# --------------------------------------------------------------------------- #

LOOP_NGRAM = 6  # words
LOOP_REPEATS = 3


def is_repetition_loop(text: str, *, ngram: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Whether a reply is caught in a repetition loop: one sentence (of two words or more) said
    `repeats` times, or one run of `ngram` words that occurs `repeats` times ("be asleep." twenty
    times, a sentence that grows by a clause each time). Case and punctuation are ignored."""
    sentences = [" ".join(re.findall(r"\w+", s.lower())) for s in re.split(r"[.!?\n]+", text)]
    if any(n >= repeats for s, n in Counter(s for s in sentences if len(s.split()) >= 2).items()):
        return True
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    return any(n >= repeats for n in grams.values())


# A reply in English that opens another turn as text ("model" or "user" on a line of its own) or holds
# letters of another script (a small model's junk tokens where a turn should end: "মডেল", "<unused>").
_TURN_AS_TEXT = re.compile(r"(^|\s)(model|user)\s*\n", re.IGNORECASE)
_OTHER_SCRIPT = re.compile(r"[^\x00-\u024f\u2000-\u2bff\U0001f000-\U0001faff\u00a0-\u00ff]")


def has_stray_text(text: str) -> bool:
    """Whether an English reply shows what a user should never see: the next turn's speaker written as
    text, or letters of another script (sampled junk tokens)."""
    return bool(_TURN_AS_TEXT.search(text) or _OTHER_SCRIPT.search(text))


@dataclass(frozen=True)
class ReplyQuality:
    """Shares over a set of replies: in a repetition loop, ended by the model (stop token) rather than
    by the token limit; and the mean length in words."""

    replies: int
    loop_share: float
    eos_share: float
    mean_words: float
    proper: int = 0  # replies that ended with the stop token and are not in a loop
    stray: int = 0  # replies with stray text (has_stray_text)

    def as_dict(self) -> dict[str, float]:
        return {"replies": self.replies, "loop_share": self.loop_share, "eos_share": self.eos_share,
                "mean_words": self.mean_words, "proper": self.proper, "stray": self.stray}


def reply_quality(texts: Sequence[str], ended: Sequence[bool]) -> ReplyQuality:
    """`ended[i]`: reply i stopped on the model's stop token (finish reason "stop", not "length")."""
    if not texts or len(texts) != len(ended):
        raise ValueError("reply_quality needs one `ended` flag per reply, and at least one reply.")
    n = len(texts)
    loops = [is_repetition_loop(t) for t in texts]
    proper = sum(bool(e) and not loop for e, loop in zip(ended, loops))
    return ReplyQuality(n, sum(loops) / n, sum(map(bool, ended)) / n,
                        sum(len(re.findall(r"\w+", t)) for t in texts) / n, proper,
                        sum(map(has_stray_text, texts)))
