"""How a round judges what it trained: the reward-model gates, the judge of the reward gain, and the
candidate's evaluation against live on held-out prompts, ending in every gate's verdict.

The pure parts live beside this: ``gates`` (a verdict from an interval or a point), ``evaluation``
(replies, scores, bootstrap intervals). This module applies them to one round and records what it
found in the round's metrics (``metrics["reward_model"]``, ``["judge"]``, ``["evaluation"]``,
``["samples"]``, ``["gates"]``, ``["gates_passed"]``, ``["auto_promotable"]``).

The judge. PPO maximises the proxy reward model, so the proxy's own score of the candidate is
biased upwards (Goodhart); the reward-gain gate is decided by a judge PPO did not optimise:

* ``previous``: the live reward model before this round. It never saw this round's new pairs, and
  held-out prompts are held out in every round. The proxy is warm-started from it, so errors they
  share are not caught, and the live policy was tuned against it (which favours live, not the
  candidate).
* ``split``: a second reward model trained on half of this round's training prompts (a second,
  independent prompt hash); the proxy trains on the other half. No pair is on both sides, and
  neither warm-starts (the previous reward model may have trained on either half). Cost: the
  proxy learns from half the pairs, and a second reward model is trained (about as long as the
  proxy, each on half the data) and loaded to score.
* ``auto``: previous when there is one, else split. ``none``: no judge and no reward-gain gate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.evaluation import (
    accuracy_interval,
    bootstrap_interval,
    json_number,
    judge_candidate,
    pairwise_correct,
)
from training.gates import (
    FAILED,
    PASSED,
    all_passed,
    auto_promotable,
    missing_gate,
    point_gate,
    reward_gain_gate,
    reward_model_gate,
    reward_model_vs_previous_gate,
)
from training.round_config import RoundConfig
from training.round_data import JudgeSplit


class RoundStop(Exception):
    """A gate or missing data ends the round as 'stopped' (not an error); the message says why and what to do."""


@dataclass
class TrainedRewardModel:
    """A reward model trained (or chosen) by this round, and how well it ranks the held-out pairs."""

    adapter_dir: Path
    name: str
    correct: list[bool]  # per held-out pair, in ``evaluation.pairwise_correct`` order
    train_pairs: int
    seconds: float
    warm_start: str | None = None  # the reward version it started from


# Trains a reward model: (name, groups, thumbs, held-out groups, reference data, warm=version) -> the model.
FitRewardModel = Callable[..., TrainedRewardModel]


class RoundJudging:
    """The judgements of one round, written into its ``metrics`` (shared with the round's runner)."""

    def __init__(self, config: RoundConfig, metrics: dict[str, Any], round_id: int) -> None:
        self.config, self.metrics, self.round_id = config, metrics, round_id
        self.previous_correct: list[bool] | None = None  # the previous reward model on the held-out pairs

    def reward_model(self, proxy: TrainedRewardModel, previous: Any | None, held: list[Any],
                     history: list[dict[str, Any]]) -> bool:
        """The reward-model gates on the proxy's held-out pairs; stop the round when one clearly fails.

        ``history``: every earlier round's reward-model accuracy, then this one (for the report).
        Returns whether the new reward model may become the live one (both gates passed).
        """
        from training.reward_model import RewardModel

        c = self.config
        accuracy = accuracy_interval(proxy.correct)
        rm = {"eval_accuracy": accuracy.value, "eval_accuracy_ci": accuracy.ci, "eval_pairs": accuracy.n,
              "eval_prompts": len(held), "train_pairs": proxy.train_pairs, "seconds": proxy.seconds,
              "warm_start": proxy.warm_start,
              "floor": c.rm_floor, "tolerance": c.rm_tolerance}
        self.metrics["reward_model"] = rm
        self.metrics["reward_model_history"] = history
        gates = self.metrics["gates"]
        gates["reward_model"] = reward_model_gate(accuracy, c.rm_floor, c.min_rm_eval_pairs).to_dict()
        if previous is not None:
            before = pairwise_correct(RewardModel.load(previous.adapter_path, base_model=c.base_model,
                                                       device=c.device), held)
            self.previous_correct = before
            rm["previous"] = previous.name
            rm["previous_accuracy"] = json_number(accuracy_interval(before).value)
            # Held-out prompts are chosen by hash, the same in every round, so the previous reward
            # model never trained on them either: both are judged on the same unseen pairs.
            difference = bootstrap_interval([int(a) - int(b) for a, b in zip(proxy.correct, before)],
                                            resamples=c.bootstrap_resamples, seed=c.seed)
            gates["reward_model_vs_previous"] = reward_model_vs_previous_gate(
                difference, c.rm_tolerance, c.min_rm_eval_pairs).to_dict()
        if gates["reward_model"]["verdict"] == FAILED:
            lo, hi = accuracy.ci
            raise RoundStop(f"reward model held-out accuracy {accuracy.value:.3f} (95% interval {lo:.3f}-{hi:.3f}, "
                            f"{accuracy.n} pairs) is below the floor {c.rm_floor}; collect more (and more consistent) "
                            "preference votes.")
        if gates.get("reward_model_vs_previous", {}).get("verdict") == FAILED:
            raise RoundStop(f"the new reward model ({accuracy.value:.3f}) is worse than the previous one "
                            f"{previous.name} ({rm['previous_accuracy']:.3f}) on the same held-out pairs by more than "
                            f"{c.rm_tolerance} (95% interval); keeping the previous one.")
        return all(g["verdict"] == PASSED for k, g in gates.items() if k.startswith("reward_model"))

    def judge_kind(self, previous: Any | None) -> str:
        """The judge this round uses: ``config.judge``, with 'auto' resolved."""
        if self.config.judge != "auto":
            return self.config.judge
        return "previous" if previous is not None else "split"

    def choose_judge(self, kind: str, previous: Any | None, split: JudgeSplit | None, held: list[Any],
                     reference: Path | None, fit: FitRewardModel) -> TrainedRewardModel | None:
        """The judge of the reward-gain gate (see the module docstring); None when there is none.
        ``fit`` trains the split judge (the round's own reward-model trainer)."""
        record: dict[str, Any] = {"kind": kind}
        self.metrics["judge"] = record
        judge: TrainedRewardModel | None = None
        if kind == "previous" and previous is not None:
            judge = TrainedRewardModel(Path(previous.adapter_path), previous.name, self.previous_correct or [], 0, 0.0)
        elif kind == "previous":
            record["note"] = "no previous reward model to judge with; use judge=split (or auto)"
        elif kind == "split" and split is not None and split.judge_groups:
            judge = fit("judge", split.judge_groups, split.judge_thumbs, held, reference, warm=None)
            judge = dataclasses.replace(judge, name=f"judge-r{self.round_id} (trained on the other half; not kept)")
            record.update({"train_pairs": judge.train_pairs, "train_prompts": len(split.judge_groups),
                           "proxy_train_prompts": len(split.proxy_groups), "seconds": judge.seconds})
        elif kind == "split":
            record["note"] = "too few training prompts to split between the proxy and a judge"
        if judge is not None:
            accuracy = accuracy_interval(judge.correct)
            record.update({"name": judge.name, "eval_accuracy": accuracy.value, "eval_accuracy_ci": accuracy.ci})
        return judge

    def candidate(self, ppo: Any, prompts: list[dict[str, Any]], live_adapter: str | None, rm_dir: Path,
                  judge: TrainedRewardModel | None, max_prompt_tokens: int) -> None:
        """Candidate vs live on held-out prompts only: replies drawn as ``eval_sampling`` says (by default as
        the app serves them, several per prompt), scored by the proxy and the judge; reward gains paired per
        prompt (the mean over its replies) with bootstrap intervals; then every gate's verdict."""
        c = self.config
        texts = [p["prompt"] for p in prompts]
        sampling = c.reply_sampling()
        scorers = {"proxy": rm_dir} | ({"judge": judge.adapter_dir} if judge is not None else {})
        judged = judge_candidate(c.base_model, c.device, texts, live_adapter, str(ppo.adapter_dir), scorers,
                                 max_new_tokens=c.eval_max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                                 sampling=sampling, resamples=c.bootstrap_resamples, seed=c.seed)
        scores, gains = judged.scores, judged.gains
        replies = {side: [row[0] for row in rows] for side, rows in judged.replies.items()}
        before, after = ppo.ptx_nll_before, ppo.ptx_nll_after
        measured = not (math.isnan(before) or math.isnan(after))
        evaluation: dict[str, Any] = {"heldout_prompts": len(texts), "sampling": sampling.describe()}
        for role in scorers:
            prefix = "" if role == "proxy" else "judge_"
            live_s, cand_s = scores[role]["live"], scores[role]["candidate"]
            evaluation.update({f"{prefix}reward_live": _mean(live_s), f"{prefix}reward_candidate": _mean(cand_s),
                               f"{prefix}reward_gain": json_number(gains[role].value),
                               f"{prefix}reward_gain_ci": [json_number(x) for x in gains[role].ci]})
        evaluation.update({
            "judge": judge.name if judge is not None else None,
            "kl_to_reference": ppo.kl_last,
            "ptx_ppl_before": math.exp(before) if measured else None,
            "ptx_ppl_after": math.exp(after) if measured else None,
            "ptx_ppl_increase": math.exp(after - before) - 1 if measured else None,
        })
        self.metrics["evaluation"] = evaluation
        samples = []
        for i, (text, a, b) in enumerate(zip(texts, replies["live"], replies["candidate"])):
            sample = {"prompt": text, "live": a, "candidate": b, "reward_live": scores["proxy"]["live"][i],
                      "reward_candidate": scores["proxy"]["candidate"][i]}
            if "judge" in scores:
                sample.update(judge_live=scores["judge"]["live"][i], judge_candidate=scores["judge"]["candidate"][i])
            samples.append(sample)
        self.metrics["samples"] = samples

        gates = self.metrics["gates"]
        if c.judge != "none":
            gates["reward_gain"] = (reward_gain_gate(gains["judge"], c.min_reward_gain, c.min_eval_prompts)
                                    if judge is not None else
                                    missing_gate(c.min_reward_gain, self.metrics["judge"].get("note", "no judge"))
                                    ).to_dict()
        gates["kl"] = point_gate(ppo.kl_last, c.max_kl).to_dict()
        gates["ptx_perplexity"] = point_gate(evaluation["ptx_ppl_increase"] if measured else float("nan"),
                                             c.max_ptx_ppl_increase).to_dict()
        self.metrics["gates_passed"] = all_passed(gates)
        self.metrics["auto_promotable"] = auto_promotable(gates, users_settle_undecided=c.users_settle_undecided)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
