"""The statistics behind the gates, on hand-made numbers: bootstrap and Wilson intervals, paired gains."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from feedback_db import wilson_interval
from training.evaluation import (
    accuracy_interval,
    bootstrap_interval,
    greedy_replies,
    paired_gains,
    pairwise_correct,
    policy_replies,
    reward_accuracy,
)
from training.sampling import APP_SAMPLING, GREEDY, ReplyPenalty, ReplySampling


def test_bootstrap_of_constant_gains_is_a_zero_width_interval_at_the_constant() -> None:
    est = bootstrap_interval([0.25] * 12)
    assert (est.value, est.low, est.high, est.n) == (0.25, 0.25, 0.25, 12)


def test_bootstrap_interval_holds_the_mean_and_has_the_normal_width() -> None:
    # 0..9 repeated: mean 4.5, sd 2.87; 95% interval of the mean of n=100 is about 4.5 -/+ 1.96 * 0.287.
    values = [float(i % 10) for i in range(100)]
    est = bootstrap_interval(values, seed=3)
    assert est.value == pytest.approx(4.5) and est.low < 4.5 < est.high
    half = 1.96 * (sum((v - 4.5) ** 2 for v in values) / 100) ** 0.5 / 10
    assert (est.high - est.low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_interval(values, seed=3) == est  # a fixed seed gives the same interval
    narrow = bootstrap_interval(values * 4, seed=3)  # 4x the prompts: about half the width
    assert (narrow.high - narrow.low) == pytest.approx((est.high - est.low) / 2, rel=0.2)


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    trials, covered = 200, 0
    for t in range(trials):
        sample = [rng.gauss(1.0, 2.0) for _ in range(40)]
        est = bootstrap_interval(sample, resamples=500, seed=t)
        covered += est.low <= 1.0 <= est.high
    assert 0.88 <= covered / trials <= 0.99  # the percentile bootstrap runs a little short at n = 40


def test_bootstrap_of_nothing_is_nan() -> None:
    est = bootstrap_interval([])
    assert est.n == 0 and all(math.isnan(x) for x in (est.value, est.low, est.high))


def test_accuracy_interval_is_wilsons() -> None:
    est = accuracy_interval([True] * 18 + [False] * 2)
    assert est.value == 0.9 and est.n == 20
    assert (est.low, est.high) == pytest.approx(wilson_interval(18, 20), abs=1e-4)  # z = 1.95996 vs 1.96
    assert est.low == pytest.approx(0.699, abs=1e-3) and est.high == pytest.approx(0.972, abs=1e-3)
    assert math.isnan(accuracy_interval([]).low)


def test_paired_gains_pair_by_prompt() -> None:
    assert paired_gains([1.0, 0.5, -1.0], [0.5, 0.5, 0.0]) == [0.5, 0.0, -1.0]
    with pytest.raises(ValueError, match="one live score per candidate"):
        paired_gains([1.0], [])


@dataclass
class Group:
    prompt: str
    completions: list[str]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)


class LengthRM:
    """A reward model that prefers longer replies."""

    def score(self, prompts: list[str], replies: list[str], ended: list[bool] | None = None) -> list[float]:
        return [float(len(r)) for r in replies]


def test_pairwise_correct_counts_ties_as_wrong() -> None:
    groups = [Group("p", ["long reply", "short", "tiny!"], [(0, 1), (1, 2), (2, 0)]), Group("q", ["ab", "a"], [(1, 0)])]
    assert pairwise_correct(LengthRM(), groups) == [True, False, False, False]  # "short" vs "tiny!" is a tie
    assert reward_accuracy(LengthRM(), groups) == 0.25 and math.isnan(reward_accuracy(LengthRM(), []))


def test_stray_turns_and_junk_tokens_are_caught_and_ordinary_replies_are_not() -> None:
    from training.evaluation import has_stray_text, reply_quality

    assert has_stray_text("Sleep at the same time. model\nKeep the room dark.")
    assert has_stray_text("Keep the room dark.মডেল\nStay up later.")
    assert not has_stray_text("Café au lait — 2 tips: “rest” and ‘light’ 😊\nThe user model of a bank is fine.")
    assert reply_quality(["ok.", "Fine. user\nmore"], [True, True]).stray == 1


def test_repetition_loops_are_caught_and_ordinary_replies_are_not() -> None:
    from training.evaluation import is_repetition_loop, reply_quality

    assert is_repetition_loop("be asleep. " * 20)
    assert is_repetition_loop("I like tea and I like it hot. I like tea and I like it hot! i like TEA and I like it hot")
    assert is_repetition_loop("The cat sat on the mat and the cat sat on the mat and the cat sat on the mat and")
    assert not is_repetition_loop("Keep a regular bedtime. Keep your room dark and cool. Keep screens out of bed.")
    assert not is_repetition_loop("Yes. Yes. Yes.")  # one-word sentences are not a loop
    q = reply_quality(["be asleep. " * 5, "Sleep in a dark, cool room."], [False, True])
    assert (q.replies, q.loop_share, q.eos_share, q.mean_words) == (2, 0.5, 0.5, 8.0)


def test_reply_quality_script_runs_on_the_tiny_model(tiny_model_path, tmp_path) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "quality.json"
    done = subprocess.run([sys.executable, "scripts/reply_quality.py", "--base-model", str(tiny_model_path),
                           "--max-tokens", "4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["prompts"] == 20 and len(data["models"]["base"]["replies"]) == 20
    assert "| base |" in done.stdout


# -- how evaluation replies are drawn ------------------------------------------------------------


def test_reply_penalty_counts_the_reply_tokens_only() -> None:
    import torch

    ids = torch.tensor([[5, 7, 7, 3]])  # a one-token prompt (5), then the reply 7 7 3
    scores = ReplyPenalty(prompt_length=1, frequency=0.5, presence=1.0)(ids, torch.zeros(1, 10))
    assert scores[0, 7].item() == -2.0  # 0.5 x 2 + 1
    assert scores[0, 3].item() == -1.5
    assert scores[0, 5].item() == 0.0  # only in the prompt


def test_served_warper_applies_temperature_then_min_p_then_top_p_as_vllm_does() -> None:
    import torch
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper

    from training.sampling import ServedWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 500) * 3
    kept = lambda scores: torch.isfinite(scores)  # noqa: E731
    # Each step alone keeps what transformers' warper keeps (ServedWarper works in place, as generate allows).
    assert torch.equal(kept(ServedWarper(1.0, min_p=0.2)(None, logits.clone())),
                       kept(MinPLogitsWarper(0.2)(None, logits.clone())))
    assert torch.equal(kept(ServedWarper(1.0, top_p=0.9)(None, logits.clone())),
                       kept(TopPLogitsWarper(0.9)(None, logits.clone())))
    assert torch.allclose(ServedWarper(0.5)(None, logits.clone()), TemperatureLogitsWarper(0.5)(None, logits.clone()))
    # Probabilities 0.5, 0.3, 0.12, 0.08: min-p 0.2 drops what is under 0.2 x 0.5 = 0.1 (0.08 only); top-p 0.7
    # then sees 0.54, 0.33, 0.13 (renormalised) and keeps the first two (0.54 < 0.7 <= 0.54 + 0.33).
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    out = ServedWarper(1.0, min_p=0.2, top_p=0.7)(None, probs.log())
    assert kept(out).tolist() == [[True, True, False, False]]
    # transformers' own order (top-p first, on the full distribution) keeps the same two here, but sorts every
    # token; on the real 262k vocabulary, min-p first leaves top-p a few dozen to sort.


def test_reply_sampling_refuses_what_would_not_mean_what_it_says() -> None:
    with pytest.raises(ValueError, match="one per prompt"):
        GREEDY.with_samples(3)
    with pytest.raises(ValueError):
        ReplySampling(temperature=0.8, top_p=0.0)
    options = APP_SAMPLING.generate_options(prompt_length=12)
    penalty, warper = options["logits_processor"]
    assert options["do_sample"] and isinstance(penalty, ReplyPenalty) and (warper.min_p, warper.top_p) == (0.1, 0.95)
    assert (options["temperature"], options["top_p"], options["top_k"]) == (1.0, 1.0, 0)  # generate's own are off
    assert GREEDY.generate_options(12) == {"do_sample": False}


def test_policy_replies_draws_seeded_samples_per_prompt_and_greedy_is_one_of_them(tiny_model_path) -> None:
    prompts = ["How do I bake bread?", "Give me one tip for sleeping better."]
    sampling = APP_SAMPLING.with_samples(3)
    first = policy_replies(str(tiny_model_path), "cpu", {"base": None}, prompts, 6, sampling=sampling, batch_rows=4)
    again = policy_replies(str(tiny_model_path), "cpu", {"base": None}, prompts, 6, sampling=sampling, batch_rows=4)
    assert [len(row) for row in first.texts["base"]] == [3, 3]
    assert first == again  # seeded: every version draws from the same stream, run after run
    # The tiny random model never says its stop token within 6 tokens: every reply was cut off.
    assert first.ended["base"] == [[False] * 3] * 2
    greedy = greedy_replies(str(tiny_model_path), "cpu", {"base": None}, prompts, 6)
    assert greedy["base"] == [row[0] for row in policy_replies(str(tiny_model_path), "cpu", {"base": None},
                                                                  prompts, 6).texts["base"]]
