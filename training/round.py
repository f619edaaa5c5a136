"""One retraining round: feedback snapshot → reward model → PPO-ptx → candidate → (auto-)promotion.

    snapshot the feedback (recorded with the round)
    → SFT when there are new demonstrations (continuing the live policy's adapter)
    → reward model, warm-started from the live one; stop if its held-out accuracy is under
      a floor or worse than the previous reward model's on the same held-out prompts
    → PPO-ptx from the SFT adapter (or the live policy) against the new reward model, with the KL
      measured to the lineage's last SFT adapter (pi_SFT; kept beside the policy as ``sft-rN``)
    → evaluate candidate vs live: reward on held-out prompts, KL to SFT, ptx perplexity
    → register the candidate (and the new reward model) in one transaction

The server then pits the candidate against live in Compare; `maybe_auto_promote` promotes it
once the gates passed and its win rate after `min_votes` decisive votes is significantly above
50% (the Wilson lower bound > 0.5). Round 0, before any preference data exists, is SFT only
(on the starter set, see `seed_starter_set`).

Safe to interrupt: every step writes under ``<round_dir>/work``; finished adapters are checked
to load, moved into ``<round_dir>/adapters/`` and registered together with the round's result
in one transaction. A round killed at any point leaves nothing registered; the next round
marks it failed and deletes its folder. A lock file refuses two rounds at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import LoraSettings, PPOConfig, RewardConfig, SFTConfig, _f
from training.evaluation import greedy_replies, reward_accuracy
from training.gates import evaluate_gates
from training.round_data import (
    STARTER_DIR,
    STARTER_FILES,
    STARTER_SOURCE,
    fixed_report_prompts,
    heldout_bucket,
    pair_count,
    seed_starter_set,
    split_heldout,
    starter_rows,
)
from training.round_lock import RoundBusyError, recover_stale_rounds, round_dir_name, round_lock, same_round_done

__all__ = [
    "STARTER_DIR", "STARTER_FILES", "STARTER_SOURCE", "RoundBusyError", "RoundConfig", "RoundResult", "RoundRunner",
    "StepHook", "check_adapter", "fixed_report_prompts", "greedy_replies", "heldout_bucket", "load_round_config",
    "maybe_auto_promote", "recover_stale_rounds", "reward_accuracy", "round_dir_name", "round_lock", "run_round",
    "same_round_done", "seed_starter_set", "split_heldout", "starter_rows",
]

# A test (or an operator's probe) can interrupt a round at a named step: hook(step, round_dir).
StepHook = Callable[[str, Path], None]


def _small_lora() -> LoraSettings:
    return LoraSettings(r=8, alpha=16)


@dataclass
class RoundConfig:
    """One retraining round; nested trainer configs are the defaults each step starts from.

    The step configs' ``base_model``, ``output_dir``, data paths and ``seed`` are set by the round.
    """

    db: str = _f("", "Feedback database (empty: $ALIGNLOOP_DB or ~/.local/share/alignloop/feedback.db).")
    base_model: str = _f("default", "Base model of every adapter: 'default' (embedded Gemma 3 270M), an HF id or a folder.")
    rounds_dir: str = _f("~/.local/share/alignloop/rounds", "Where rounds write their work, adapters and reports.")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda' for every step.")
    seed: int = _f(0, "Seed of every step and of the held-out splits.")
    heldout_fraction: float = _f(0.2, "Share of preference prompts (RM) and PPO prompts held out for evaluation.")
    min_pairs: int = _f(8, "Fewest preference pairs to train a reward model and run PPO (else SFT only or stop).")
    min_prompts: int = _f(8, "Fewest PPO training prompts to run PPO.")
    rm_floor: float = _f(0.55, "Stop the round when the reward model's held-out pairwise accuracy is below this.")
    rm_tolerance: float = _f(0.02, "Stop when the new reward model is worse than the previous one by more than this (same held-out pairs).")
    eval_prompts: int = _f(16, "Held-out prompts on which candidate and live replies are scored (and shown in the report).")
    eval_max_new_tokens: int = _f(48, "Longest reply when evaluating candidate vs live (greedy).")
    report_prompts: int = _f(4, "Fixed prompts (the starter set's first N) that every round's report answers with live and candidate, so reports compare across rounds.")
    max_kl: float = _f(10.0, "Gate: KL(policy || reference) per reply at the end of PPO, in nats.")
    min_reward_gain: float = _f(0.0, "Gate: candidate's mean reward minus live's on held-out prompts must exceed this.")
    max_ptx_ppl_increase: float = _f(0.1, "Gate: relative increase of the ptx perplexity (0.1 = +10%).")
    auto_promote: bool = _f(False, "Promote a candidate whose gates passed once its win rate vs live is significant.")
    min_votes: int = _f(30, "Decisive Compare votes (wins + losses) before auto-promotion is considered.")
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=2.0, batch_size=8, progress=False, lora=_small_lora()),
                           metadata={"help": "SFT step defaults (`--set sft.epochs=3`)."})
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=1.0, groups_per_batch=8, progress=False,
                                                                      lora=_small_lora()),
                                 metadata={"help": "Reward-model step defaults (`--set reward.lr=5e-5`)."})
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(iterations=20, rollout_batch=8, minibatch=4, ppo_epochs=2,
                                                             max_new_tokens=48, progress=False, lora=_small_lora()),
                           metadata={"help": "PPO-ptx step defaults (`--set ppo.iterations=50`)."})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass
class RoundResult:
    """How a round ended: succeeded (candidate registered), stopped (a gate or too little data), failed,
    or skipped (nothing new since the last round; not recorded, ``round_id`` is that round's)."""

    round_id: int
    status: str
    reason: str
    candidate: str | None
    metrics: dict[str, Any]
    round_dir: Path
    report_path: Path | None = None


# --------------------------------------------------------------------------- #
# Adapters and registration
# --------------------------------------------------------------------------- #


def check_adapter(folder: Path, *, with_head: bool = False) -> None:
    """Raise ValueError unless ``folder`` holds a complete peft adapter (config + readable tensors)."""
    from peft import PeftConfig
    from safetensors import safe_open

    PeftConfig.from_pretrained(str(folder))
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        if not keys or any(f.get_tensor(k).numel() == 0 for k in keys):
            raise ValueError(f"{weights} has no LoRA weights.")
    if with_head and not (folder / "scalar_head.json").is_file():
        raise ValueError(f"{folder} has no scalar head (scalar_head.json).")


# --------------------------------------------------------------------------- #
# The round
# --------------------------------------------------------------------------- #


class _Stop(Exception):
    """A gate or missing data ends the round as 'stopped' (not an error)."""


def _unique_name(registry: Any, name: str) -> str:
    from feedback_db import NotFoundError

    try:
        registry.get(name)
    except NotFoundError:
        return name
    return f"{name}-{uuid.uuid4().hex[:6]}"


def run_round(config: RoundConfig, *, seed_starter: bool = False, step_hook: StepHook | None = None) -> RoundResult:
    """Run one round (see the module docstring); returns how it ended.

    Raises RoundBusyError when another round holds the lock. A step that fails marks the round
    failed and re-raises; a gate or too little data ends it as 'stopped' with the reason.

    Example:
        >>> run_round(RoundConfig(db="feedback.db"), seed_starter=True)  # doctest: +SKIP
    """
    from feedback_db import FeedbackStore, ModelRegistry, default_db_path

    rounds_dir = Path(config.rounds_dir).expanduser().resolve()
    config = copy.deepcopy(config)
    config.rounds_dir = str(rounds_dir)
    with round_lock(rounds_dir):
        store = FeedbackStore(config.db or default_db_path())
        try:
            registry = ModelRegistry(store)
            recovered = recover_stale_rounds(registry, rounds_dir)
            seeded = seed_starter_set(store) if seed_starter else {}
            snapshot = store.snapshot()
            same = same_round_done(registry, config.to_dict(), snapshot)
            if same is not None:  # cron runs often: don't record a round that would repeat this one
                return RoundResult(same.id, "skipped", f"no new feedback since round {same.id} (snapshot {snapshot}) "
                                   "and the same configuration; nothing to train.", None, {}, rounds_dir
                                   / round_dir_name(same.id))
            record = registry.start_round(config.to_dict(), snapshot)
            round_dir = rounds_dir / round_dir_name(record.id)
            runner = RoundRunner(config, store, registry, record.id, snapshot, round_dir, step_hook)
            runner.metrics.update({"recovered_rounds": recovered, "seeded": seeded})
            return runner.run()
        finally:
            store.close()


class RoundRunner:
    """The steps of one round, sharing its folders, registry and metrics."""

    def __init__(self, config: RoundConfig, store: Any, registry: Any, round_id: int, snapshot: int,
                 round_dir: Path, step_hook: StepHook | None) -> None:
        from training.base_models import resolve_model

        self.config, self.store, self.registry = config, store, registry
        self.round_id, self.snapshot, self.round_dir = round_id, snapshot, round_dir
        self.work = round_dir / "work"
        self.step_hook = step_hook
        self.base_name = resolve_model(config.base_model).name
        self.metrics: dict[str, Any] = {"snapshot": snapshot}

    def step(self, name: str) -> None:
        self.metrics["last_step"] = name
        if self.step_hook:
            self.step_hook(name, self.round_dir)

    def run(self) -> RoundResult:
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            candidate = self.train()
        except _Stop as stop:
            return self.finish("stopped", str(stop))
        except BaseException as exc:  # noqa: BLE001 - record it, clean up, re-raise
            status = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.metrics["error"] = f"{type(exc).__name__}: {exc}"
            self.metrics["traceback"] = traceback.format_exc(limit=8)
            self.finish(status, self.metrics["error"])
            raise
        return RoundResult(self.round_id, "succeeded", "candidate registered", candidate, self.metrics,
                           self.round_dir, self.report_path())

    def report_path(self) -> Path | None:
        path = self.round_dir / "report.md"
        return path if path.is_file() else None

    def finish(self, status: str, reason: str) -> RoundResult:
        self.metrics["reason"] = reason
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.round_dir / "adapters", ignore_errors=True)  # moved into place but never registered
        self.write_report(status)
        self.registry.finish_round(self.round_id, status, metrics=self.metrics, report_path=self.report_path())
        return RoundResult(self.round_id, status, reason, None, self.metrics, self.round_dir, self.report_path())

    def write_report(self, status: str) -> None:
        try:
            from training.round_report import write_round_report

            write_round_report(self.round_dir, self.round_id, status, self.metrics)
        except Exception as exc:  # noqa: BLE001 - a report must never fail a round
            self.metrics["report_error"] = f"{type(exc).__name__}: {exc}"

    # -- the steps ---------------------------------------------------------------------------------
    def train(self) -> str:
        from feedback_db import export_ppo_prompts, export_preferences, export_sft, write_jsonl

        cfg = self.config
        data = self.work / "data"
        self.step("export")
        sft_rows = export_sft(self.store, self.snapshot).rows
        groups = export_preferences(self.store, self.snapshot, fmt="groups").rows
        prompt_rows = export_ppo_prompts(self.store, self.snapshot).rows
        train_prompts, held_prompts = split_heldout(prompt_rows, cfg.heldout_fraction)
        train_groups, held_groups = split_heldout(groups, cfg.heldout_fraction, min_heldout=1)
        self.registry.ensure_base_policy(self.base_name)
        live = self.registry.live("policy")
        self.metrics["live_policy"] = live.name
        if live.base_model not in (None, self.base_name):
            raise _Stop(f"the live policy {live.name} runs on {live.base_model}, not {self.base_name}; "
                        "pass the base model the server runs (--base-model).")
        new_demos = len(sft_rows) - self.demonstrations_at_last_sft(live)
        pairs = pair_count(groups)
        self.metrics["data"] = {"demonstrations": len(sft_rows), "new_demonstrations": new_demos,
                                "preference_groups": len(groups), "preference_pairs": pairs,
                                "prompts": len(prompt_rows), "train_prompts": len(train_prompts),
                                "heldout_prompts": len(held_prompts)}
        sft_path = data / "sft.jsonl"
        if sft_rows:
            write_jsonl(sft_rows, sft_path)
        policy_adapter = live.adapter_path
        # The KL reference (pi_SFT in eq. 2) is the lineage's last SFT adapter, not the live policy.
        reference = self.sft_reference_of(live)

        sft_dir = None
        if new_demos > 0:
            self.step("sft")
            sft_dir = self.train_sft(sft_path, policy_adapter)
            policy_adapter = reference = str(sft_dir)
            self.metrics["sft_demonstrations"] = len(sft_rows)

        enough_prefs = pairs >= cfg.min_pairs and len(groups) >= 2
        enough_prompts = len(train_prompts) >= cfg.min_prompts
        if not (enough_prefs and enough_prompts):
            why = (f"{pairs} preference pairs over {len(groups)} prompts (need {cfg.min_pairs} over 2+)"
                   if not enough_prefs else f"{len(train_prompts)} training prompts (need {cfg.min_prompts})")
            if sft_dir is None:
                raise _Stop(f"not enough feedback for a round: {why}, and no new demonstrations. Collect more "
                            "Compare/Rank votes and prompts, seed the starter set (--seed-starter), or lower "
                            "--set min_pairs / min_prompts.")
            self.metrics["mode"] = "sft-only"
            self.metrics["skipped_rm_ppo"] = why
            self.metrics["gates"] = {}
            self.metrics["gates_passed"] = True  # no reward model yet: the Compare votes decide
            self.sample_fixed_prompts(live.adapter_path, sft_dir)
            return self.register(policy=sft_dir, reward=None, live=live, sft=None)

        self.metrics["mode"] = "sft+rm+ppo" if sft_dir else "rm+ppo"
        self.step("reward_model")
        prefs_path = data / "preferences.jsonl"
        write_jsonl(train_groups, prefs_path)
        rm_dir = self.train_reward_model(prefs_path, held_groups, sft_path if sft_rows else None)

        self.step("ppo")
        prompts_path = data / "prompts.jsonl"
        write_jsonl(train_prompts, prompts_path)
        ppo = self.train_ppo(prompts_path, policy_adapter, reference, rm_dir, sft_path if sft_rows else None)

        self.step("evaluate")
        held = held_prompts or train_prompts
        self.evaluate(ppo, held[: cfg.eval_prompts], live.adapter_path, rm_dir)
        return self.register(policy=ppo.adapter_dir, reward=rm_dir, live=live, sft=sft_dir,
                             reference=reference)

    def sample_fixed_prompts(self, live_adapter: str | None, candidate: Path) -> None:
        """Greedy replies of live and candidate on the report's fixed prompts (before / after)."""
        fixed = fixed_report_prompts(self.config.report_prompts)
        if fixed:
            replies = greedy_replies(self.config.base_model, self.config.device,
                                     {"live": live_adapter, "candidate": str(candidate)}, fixed,
                                     self.config.eval_max_new_tokens)
            self.record_fixed_samples(fixed, replies)

    def record_fixed_samples(self, prompts: list[Any], replies: dict[str, list[str]]) -> None:
        self.metrics["fixed_samples"] = [{"prompt": t, "live": a, "candidate": b} for t, a, b in
                                         zip(prompts, replies["live"], replies["candidate"])]

    def reward_model_history(self, accuracy: float) -> list[dict[str, Any]]:
        """Held-out accuracy of the reward model of every earlier round that trained one, then this one."""
        history = [{"round": r.id, "accuracy": r.metrics["reward_model"]["eval_accuracy"]}
                   for r in self.registry.rounds()
                   if r.id != self.round_id and "eval_accuracy" in r.metrics.get("reward_model", {})]
        return history + [{"round": self.round_id, "accuracy": accuracy}]

    def sft_reference_of(self, live: Any) -> str | None:
        """The SFT adapter the live policy descends from (its KL reference); None: the bare base.

        Rounds record it with each policy version (``reference_adapter``); an SFT-only candidate is
        its own reference. A version registered by hand, without that record, is its own reference.
        """
        if not live.adapter_path:
            return None
        if live.metrics.get("mode") == "sft-only":
            return live.adapter_path
        recorded = live.metrics.get("reference_adapter")
        if recorded is not None:
            return recorded if recorded and Path(recorded).is_dir() else None
        return live.adapter_path

    def demonstrations_at_last_sft(self, live: Any) -> int:
        """Demonstrations the live policy's lineage was last fine-tuned on (0 before any SFT).

        Walks live → parent → ... so an SFT candidate that was never promoted does not count.
        """
        from feedback_db import NotFoundError

        version = live
        while version is not None:
            if version.round_id is not None:
                try:
                    metrics = self.registry.get_round(version.round_id).metrics
                except NotFoundError:
                    metrics = {}
                if "sft_demonstrations" in metrics:
                    return int(metrics["sft_demonstrations"])
            version = self.registry.get(version.parent_id) if version.parent_id is not None else None
        return 0

    def train_sft(self, sft_path: Path, init_adapter: str | None) -> Path:
        from training.sft import train_sft

        cfg = dataclasses.replace(self.config.sft, base_model=self.config.base_model, device=self.config.device,
                                  data=str(sft_path), output_dir=str(self.work / "sft"), seed=self.config.seed,
                                  init_adapter=init_adapter or "")
        result = train_sft(cfg)
        self.metrics["sft"] = {"steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss,
                               "seconds": result.seconds, "init_adapter": init_adapter or ""}
        return result.adapter_dir

    def train_reward_model(self, prefs_path: Path, held_rows: list[dict[str, Any]], reference: Path | None) -> Path:
        from training.chat_data import preference_groups
        from training.reward_model import RewardModel, train_reward_model

        c = self.config
        held = preference_groups(held_rows)
        if not held:
            raise _Stop("no held-out preference prompts to judge a reward model on; collect feedback on more prompts.")
        previous = self.registry.live("reward")
        warm = previous.adapter_path if previous and previous.adapter_path and Path(previous.adapter_path).is_dir() else ""
        # Held-out prompts are chosen by hash (split_heldout), the same in every round, so the previous
        # reward model never trained on them either: both are judged on the same unseen pairs.
        cfg = dataclasses.replace(c.reward, base_model=c.base_model, device=c.device, data=str(prefs_path),
                                  output_dir=str(self.work / "rm"), seed=c.seed, init_adapter=warm,
                                  eval_fraction=0.0, reference_data=str(reference or ""))
        result = train_reward_model(cfg)
        accuracy = reward_accuracy(RewardModel.load(result.adapter_dir, base_model=c.base_model, device=c.device), held)
        rm = {"eval_accuracy": accuracy, "eval_pairs": sum(len(g.pairs) for g in held),
              "eval_prompts": len(held), "train_pairs": result.train_pairs, "seconds": result.train_seconds,
              "warm_start": previous.name if warm else None, "floor": c.rm_floor, "tolerance": c.rm_tolerance}
        self.metrics["reward_model"] = rm
        self.metrics["reward_model_history"] = self.reward_model_history(accuracy)
        if warm:
            rm["previous_accuracy"] = reward_accuracy(RewardModel.load(warm, base_model=c.base_model, device=c.device),
                                                      held)
        if accuracy < c.rm_floor:
            raise _Stop(f"reward model held-out accuracy {accuracy:.3f} is below the floor {c.rm_floor} "
                        f"({rm['eval_pairs']} pairs); collect more (and more consistent) preference votes.")
        prev = rm.get("previous_accuracy")
        if prev is not None and accuracy < prev - c.rm_tolerance:
            raise _Stop(f"the new reward model ({accuracy:.3f}) is worse than the previous one "
                        f"{previous.name} ({prev:.3f}) on the same held-out pairs; keeping the previous one.")
        return result.adapter_dir

    def train_ppo(self, prompts_path: Path, policy_adapter: str | None, reference: str | None, rm_dir: Path,
                  sft_path: Path | None) -> Any:
        from training.ppo import train_ppo

        c = self.config
        ptx = {"sft_data": str(sft_path)} if sft_path else {"sft_data": "", "pretrain_data": str(STARTER_DIR / STARTER_FILES["sft"])}
        # The policy starts from the live policy (or this round's SFT adapter) and is kept near
        # the lineage's SFT adapter: eq. 2's KL is to pi_SFT, however many PPO rounds came since.
        cfg = dataclasses.replace(c.ppo, base_model=c.base_model, device=c.device, prompts=str(prompts_path),
                                  sft_adapter=reference or "", init_adapter=policy_adapter or "",
                                  reward_adapter=str(rm_dir), output_dir=str(self.work / "ppo"), seed=c.seed, **ptx)
        result = train_ppo(cfg)
        from training.metrics_log import read_metrics

        curve = [{"iteration": r.get("step"), "reward": r["reward/mean"], "kl": r["kl/per_reply"]}
                 for r in read_metrics(result.metrics_path) if "reward/mean" in r]
        self.metrics["ppo"] = {"iterations": result.iterations, "reward_first": result.reward_first,
                               "reward_last": result.reward_last, "kl_last": result.kl_last,
                               "ptx_nll_before": result.ptx_nll_before, "ptx_nll_after": result.ptx_nll_after,
                               "seconds": result.seconds, "curve": curve, "start": policy_adapter or "base",
                               "reference": reference or "base"}
        return result

    def evaluate(self, ppo: Any, prompts: list[dict], live_adapter: str | None, rm_dir: Path) -> None:
        from training.reward_model import RewardModel

        c = self.config
        texts = [p["prompt"] for p in prompts]
        fixed = fixed_report_prompts(c.report_prompts)
        replies = greedy_replies(c.base_model, c.device, {"live": live_adapter, "candidate": str(ppo.adapter_dir)},
                                 texts + fixed, c.eval_max_new_tokens)
        self.record_fixed_samples(fixed, {k: v[len(texts):] for k, v in replies.items()})
        replies = {k: v[: len(texts)] for k, v in replies.items()}
        rm = RewardModel.load(rm_dir, base_model=c.base_model, device=c.device)
        live_scores = rm.score(texts, replies["live"])
        cand_scores = rm.score(texts, replies["candidate"])
        before, after = ppo.ptx_nll_before, ppo.ptx_nll_after
        evaluation = {
            "heldout_prompts": len(texts),
            "reward_live": sum(live_scores) / len(texts),
            "reward_candidate": sum(cand_scores) / len(texts),
            "kl_to_reference": ppo.kl_last,
            "ptx_ppl_before": math.exp(before) if not math.isnan(before) else float("nan"),
            "ptx_ppl_after": math.exp(after) if not math.isnan(after) else float("nan"),
        }
        evaluation["reward_gain"] = evaluation["reward_candidate"] - evaluation["reward_live"]
        evaluation["ptx_ppl_increase"] = (math.exp(after - before) - 1) if not math.isnan(before) else 0.0
        self.metrics["evaluation"] = evaluation
        self.metrics["samples"] = [{"prompt": t, "live": a, "candidate": b, "reward_live": ra, "reward_candidate": rb}
                                   for t, a, b, ra, rb in zip(texts, replies["live"], replies["candidate"],
                                                              live_scores, cand_scores)]
        gates = evaluate_gates(evaluation, c)
        self.metrics["gates"] = gates
        self.metrics["gates_passed"] = all(gates.values())

    def register(self, *, policy: Path, reward: Path | None, live: Any, sft: Path | None,
                 reference: str | None = None) -> str:
        """Check the adapters load, move them into place, register them and close the round: one transaction.

        ``sft``: this round's SFT adapter when PPO started from it; it is kept beside the policy as
        the KL reference of this lineage's later rounds.
        """
        self.step("register")
        check_adapter(policy)
        if reward is not None:
            check_adapter(reward, with_head=True)
        if sft is not None:
            check_adapter(sft)
        adapters = self.round_dir / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        policy_name = _unique_name(self.registry, f"policy-r{self.round_id}")
        final_policy = adapters / policy_name
        os.replace(policy, final_policy)
        if sft is not None:
            reference = str(adapters / f"sft-r{self.round_id}")
            os.replace(sft, reference)
        final_reward = None
        if reward is not None:
            reward_name = _unique_name(self.registry, f"reward-r{self.round_id}")
            final_reward = adapters / reward_name
            os.replace(reward, final_reward)
        self.metrics["candidate"] = policy_name
        self.metrics["reason"] = "candidate registered"
        shutil.rmtree(self.work, ignore_errors=True)
        self.write_report("succeeded")
        version_metrics = {k: self.metrics[k] for k in ("mode", "gates", "gates_passed", "evaluation", "reward_model",
                                                        "sft") if k in self.metrics}
        if "ppo" in self.metrics:
            version_metrics["ppo"] = {k: v for k, v in self.metrics["ppo"].items() if k != "curve"}
            version_metrics["reference_adapter"] = reference or ""
            self.metrics["ppo"]["reference"] = reference or "base"
        self.step("commit")
        with self.store.transaction():
            if final_reward is not None:
                rm_version = self.registry.register(reward_name, kind="reward", adapter_path=str(final_reward),
                                                    base_model=self.base_name, round_id=self.round_id,
                                                    metrics=self.metrics.get("reward_model", {}))
                self.registry.promote(rm_version.id, actor=f"round-{self.round_id}")
            self.registry.register(policy_name, kind="policy", adapter_path=str(final_policy),
                                   base_model=self.base_name, parent_id=live.id, round_id=self.round_id,
                                   metrics=version_metrics)
            self.registry.finish_round(self.round_id, "succeeded", metrics=self.metrics,
                                       report_path=self.report_path())
        return policy_name


# --------------------------------------------------------------------------- #
# Promotion
# --------------------------------------------------------------------------- #


def maybe_auto_promote(store: Any, config: RoundConfig) -> str | None:
    """Promote the newest policy candidate if auto-promotion is on, its gates passed, and after at least
    ``min_votes`` decisive Compare votes against live its win rate's 95% Wilson lower bound is above 0.5.

    Returns the promoted version's name, else None. Safe to call from cron or the server, often.
    """
    from feedback_db.promotion import auto_promote_candidate
    from training.base_models import resolve_model

    if not config.auto_promote:
        return None
    return auto_promote_candidate(store, resolve_model(config.base_model).name, config.min_votes)


def load_round_config(path: str | Path) -> RoundConfig:
    """A RoundConfig from JSON (e.g. the config a round recorded); nested step configs included."""
    from training.config import ConfigError, config_from_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"No round configuration file at {path}.")
    data = json.loads(path.read_text())
    nested = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
    steps = {k: config_from_dict(cls, data.pop(k)) for k, cls in nested.items() if isinstance(data.get(k), dict)}
    names = {f.name for f in dataclasses.fields(RoundConfig)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"RoundConfig has no field(s) {', '.join(sorted(unknown))}.")
    return RoundConfig(**data, **steps)
