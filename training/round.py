"""One retraining round: feedback snapshot → reward model → PPO-ptx → candidate → (auto-)promotion.

    snapshot the feedback (recorded with the round) and split it by prompt hash into training and
      held-out prompts (``round_data``), the same split for pairs, PPO prompts and thumbs
    → SFT when there are new demonstrations (continuing the live policy's adapter)
    → the proxy reward model PPO will optimise, and a judge it will not (``round_judging``);
      the reward-model gates judge the proxy's held-out accuracy (Wilson interval) against a floor
      and against the previous reward model on the same held-out pairs (paired bootstrap)
    → PPO-ptx from the SFT adapter (or the live policy) against the proxy, with the KL measured to
      the lineage's last SFT adapter (pi_SFT; kept beside the policy as ``sft-rN``)
    → evaluate candidate vs live on held-out prompts only (``round_judging``, with ``evaluation``): the
      proxy's and the judge's reward gain, each paired per prompt with a bootstrap interval; KL to
      SFT; ptx perplexity
    → gate verdicts (``gates``: passed, failed or not enough evidence)
    → register the candidate (and the new reward model) in one transaction

A reward-model gate that clearly fails stops the round before PPO. Any other verdict than
"passed" (a failed candidate gate, or not enough evidence: too few held-out prompts or pairs, an
interval straddling its threshold, no judge) still registers the candidate, for the operator to
read and users to compare, but with ``gates_passed`` False; its reward model is registered but not
made live. Such a candidate is auto-promoted only when ``auto_promotable`` (training/gates.py): the
only gates not passed are reward-model or judge gates that are undecided (enough held-out units,
an interval straddling the threshold), and the users' Compare votes then pass the sequential test.

The server then pits the candidate against live in Compare; `round_promotion.maybe_auto_promote` promotes it
once the gates passed and its Compare votes pass the sequential test of
feedback_db/sequential_testing.py (valid however often it is checked; distinct, capped voters).
Round 0, before any preference data exists, is SFT only (on the starter set, see
`seed_starter_set`); it has no gates, the Compare votes decide.

Where things are: this file runs the steps in order (``RoundRunner.train``) and registers the
result; ``round_data`` (the snapshot and its splits), ``round_judging`` (the reward-model gates,
the judge, the candidate's evaluation and every verdict), ``round_lock`` (one round at a time,
recovery), ``round_promotion`` (auto-promotion), ``round_report`` (the Markdown report).

Safe to interrupt: every step writes under ``<round_dir>/work``; finished adapters are checked
to load, moved into ``<round_dir>/adapters/`` and registered together with the round's result
in one transaction. A round killed at any point leaves nothing registered; the next round
marks it failed and deletes its folder (``round_lock``). A lock file refuses two rounds at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import MIN_PROMPT_TOKENS
from training.evaluation import (
    accuracy_interval,
    greedy_replies,
    pairwise_correct,
    reward_accuracy,
)
from training.progress import StepProgress, reporting
from training.round_config import RoundConfig
from training.round_data import (
    STARTER_DIR,
    STARTER_FILES,
    STARTER_SOURCE,
    fixed_report_prompts,
    heldout_bucket,
    judge_split,
    pair_count,
    seed_starter_set,
    snapshot_data,
    split_heldout,
    starter_rows,
)
from training.round_judging import RoundJudging, RoundStop, TrainedRewardModel
from training.round_lock import (
    RoundBusyError,
    recover_stale_rounds,
    round_dir_name,
    round_lock,
    same_round_done,
)
from training.safetensors_header import safetensors_shapes

__all__ = [
    "STARTER_DIR", "STARTER_FILES", "STARTER_SOURCE", "RoundBusyError", "RoundConfig", "RoundResult", "RoundRunner",
    "StepHook", "check_adapter", "fixed_report_prompts", "greedy_replies", "heldout_bucket", "recover_stale_rounds",
    "reward_accuracy", "round_dir_name", "round_lock", "run_round", "same_round_done", "seed_starter_set",
    "split_heldout", "starter_rows",
]

log = logging.getLogger(__name__)

# A test (or an operator's probe) can interrupt a round at a named step: hook(step, round_dir).
StepHook = Callable[[str, Path], None]


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
    """Raise ValueError unless ``folder`` holds a complete LoRA adapter: a peft config and a whole
    safetensors file of non-empty tensors (and a scalar head, ``with_head``).

    Reads the JSON config and the safetensors header only, never torch or the weights: `alignloop
    promote` checks a version beside a live server without competing with it for the cores.
    """
    if not folder.is_dir():  # else peft would look a relative path up on the model hub
        raise ValueError(f"{folder} is not a folder.")
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path} is missing or not JSON ({exc}).") from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise ValueError(f"{config_path} is not a peft adapter config (no peft_type).")
    weights = folder / "adapter_model.safetensors"
    shapes = safetensors_shapes(weights)
    if not shapes or any(math.prod(shape) == 0 for shape in shapes.values()):
        raise ValueError(f"{weights} has no LoRA weights.")
    if with_head and not (folder / "scalar_head.json").is_file():
        raise ValueError(f"{folder} has no scalar head (scalar_head.json).")


# --------------------------------------------------------------------------- #
# The round
# --------------------------------------------------------------------------- #


def _unique_name(registry: Any, name: str) -> str:
    from feedback_db import NotFoundError

    try:
        registry.get(name)
    except NotFoundError:
        return name
    return f"{name}-{uuid.uuid4().hex[:6]}"


def run_round(config: RoundConfig, *, seed_starter: bool = False, step_hook: StepHook | None = None,
              sampler_factory: Callable[..., Any] | None = None) -> RoundResult:
    """Run one round (see the module docstring); returns how it ended.

    Raises RoundBusyError when another round holds the lock. A step that fails marks the round
    failed and re-raises; a gate or too little data ends it as 'stopped' with the reason.
    ``sampler_factory`` is passed to ``train_ppo`` (the rollout engine PPO samples with).

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
            runner = RoundRunner(config, store, registry, record.id, snapshot, round_dir, step_hook,
                                 sampler_factory=sampler_factory)
            runner.metrics.update({"recovered_rounds": recovered, "seeded": seeded})
            return runner.run()
        finally:
            store.close()


class RoundRunner:
    """The steps of one round, sharing its folders, registry and metrics."""

    def __init__(self, config: RoundConfig, store: Any, registry: Any, round_id: int, snapshot: int,
                 round_dir: Path, step_hook: StepHook | None, *,
                 sampler_factory: Callable[..., Any] | None = None) -> None:
        from training.base_models import resolve_model

        self.config, self.store, self.registry = config, store, registry
        self.round_id, self.snapshot, self.round_dir = round_id, snapshot, round_dir
        self.work = round_dir / "work"
        self.data_dir = self.work / "data"
        self.step_hook = step_hook
        self.sampler_factory = sampler_factory
        self.base_name = resolve_model(config.base_model).name
        self.metrics: dict[str, Any] = {"snapshot": snapshot}
        self.judging = RoundJudging(config, self.metrics, round_id)  # the gates, the judge, the evaluation
        self._published = -1e9  # when the progress was last recorded (time.monotonic)

    def step(self, name: str) -> None:
        """Enter step ``name``: the time since the previous step is booked to it (the report's "where the time went")."""
        now = time.perf_counter()
        last = self.metrics.get("last_step")
        if last is not None:
            timing = self.metrics.setdefault("step_seconds", {})
            timing[last] = timing.get(last, 0.0) + now - self._step_started
        self._step_started = now
        self.metrics["last_step"] = name
        self._publish({"step": name})
        if self.step_hook:
            self.step_hook(name, self.round_dir)

    PROGRESS_EVERY_S = 3.0

    def _publish(self, progress: dict[str, Any], *, force: bool = True) -> None:
        """Record where the round is in the registry (the app's banner reads it), at most every few seconds."""
        now = time.monotonic()
        if not force and now - self._published < self.PROGRESS_EVERY_S:
            return
        self._published = now
        try:
            self.registry.record_progress(self.round_id, {"step": self.metrics.get("last_step"), **progress})
        except Exception as exc:  # noqa: BLE001 - progress is for show; it must never fail a round
            log.warning("could not record the round's progress: %s", exc)

    def report_loop(self, p: StepProgress) -> None:
        """A trainer's loop finished a step (training.progress): publish it, with the time left."""
        self._publish({"what": p.what, "done": p.done, "total": p.total,
                       "eta_s": None if p.eta_s is None else round(p.eta_s)}, force=p.done == p.total)

    def run(self) -> RoundResult:
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            with reporting(self.report_loop):
                candidate = self.train()
        except RoundStop as stop:
            return self.finish("stopped", str(stop))
        except BaseException as exc:
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
        self.step("end")
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
        from feedback_db import write_jsonl

        cfg = self.config
        self.step("export")
        data = snapshot_data(self.store, self.snapshot, cfg.heldout_fraction, thumbs=cfg.use_thumbs)
        self.registry.ensure_base_policy(self.base_name)
        live = self.registry.live("policy")
        self.metrics["live_policy"] = live.name
        if live.base_model not in (None, self.base_name):
            raise RoundStop(f"the live policy {live.name} runs on {live.base_model}, not {self.base_name}; "
                        "pass the base model the server runs (--base-model).")
        trained_on = self.demonstrations_at_last_sft(live)
        new_demos = len(data.sft) - trained_on
        pairs = pair_count(data.groups)
        self.metrics["data"] = {**data.counts(), "new_demonstrations": new_demos}
        sft_path = self.data_dir / "sft.jsonl"
        if data.sft:
            write_jsonl(data.sft, sft_path)
        sft_data = sft_path if data.sft else None
        policy_adapter = live.adapter_path
        # The KL reference (pi_SFT in eq. 2) is the lineage's last SFT adapter, not the live policy.
        reference = self.sft_reference_of(live)

        sft_dir = None
        ppo_trained = bool(policy_adapter) and reference != policy_adapter
        if new_demos > 0 and ppo_trained and cfg.sft_after_ppo == "skip":
            self.metrics["sft_skipped"] = (f"{new_demos} new demonstrations left to PPO's ptx term and the reward "
                                           f"model: the live policy {live.name} was PPO-trained (sft_after_ppo=skip)")
        elif new_demos > 0:
            self.step("sft")
            round_sft = self.data_dir / "sft-round.jsonl"
            write_jsonl(self.sft_rows(data.sft, new_demos, continued=bool(policy_adapter) and trained_on > 0),
                        round_sft)
            sft_dir = self.train_sft(round_sft, policy_adapter)
            policy_adapter = reference = str(sft_dir)
            self.metrics["sft_demonstrations"] = len(data.sft)

        enough_prefs = pairs >= cfg.min_pairs and len(data.groups) >= 2
        enough_prompts = len(data.train_prompts) >= cfg.min_prompts
        if not (enough_prefs and enough_prompts):
            why = (f"{pairs} preference pairs over {len(data.groups)} prompts (need {cfg.min_pairs} over 2+)"
                   if not enough_prefs else f"{len(data.train_prompts)} training prompts (need {cfg.min_prompts})")
            if sft_dir is None:
                raise RoundStop(f"not enough feedback for a round: {why}, and no demonstrations to fine-tune on "
                            "(none new, or sft_after_ppo=skip). Collect more "
                            "Compare/Rank votes and prompts, seed the starter set (--seed-starter), or lower "
                            "--set min_pairs / min_prompts.")
            self.metrics["mode"] = "sft-only"
            self.metrics["skipped_rm_ppo"] = why
            self.metrics["gates"] = {}
            self.metrics["gates_passed"] = True  # no reward model yet: the Compare votes decide
            self.metrics["auto_promotable"] = True
            self.sample_fixed_prompts(live.adapter_path, sft_dir)
            return self.register(policy=sft_dir, reward=None, live=live, sft=None)

        self.metrics["mode"] = "sft+rm+ppo" if sft_dir else "rm+ppo"
        self.metrics["gates"] = {}
        self.step("reward_model")
        previous = self.previous_reward_model()
        judge_kind = self.judging.judge_kind(previous)
        split = judge_split(data.train_groups, data.train_thumbs) if judge_kind == "split" else None
        held = self.held_groups(data.held_groups)
        proxy = self.fit_reward_model(
            "rm", split.proxy_groups if split else data.train_groups, split.proxy_thumbs if split else data.train_thumbs,
            held, sft_data, warm=previous if judge_kind != "split" else None)
        rm_promote = self.judging.reward_model(proxy, previous, held,
                                               self.reward_model_history(accuracy_interval(proxy.correct).value))

        self.step("judge")
        judge = self.judging.choose_judge(judge_kind, previous, split, held, sft_data, self.fit_reward_model)

        self.step("ppo")
        prompts_path = self.data_dir / "prompts.jsonl"
        write_jsonl(data.train_prompts, prompts_path)
        ppo = self.train_ppo(prompts_path, policy_adapter, reference, proxy.adapter_dir, sft_data)

        self.step("evaluate")
        self.sample_fixed_prompts(live.adapter_path, ppo.adapter_dir)
        self.judging.candidate(ppo, data.eval_prompts(cfg.eval_prompts), live.adapter_path, proxy.adapter_dir, judge,
                               self.eval_prompt_tokens())
        return self.register(policy=ppo.adapter_dir, reward=proxy.adapter_dir, live=live, sft=sft_dir,
                             reference=reference, promote_reward=rm_promote)

    def sample_fixed_prompts(self, live_adapter: str | None, candidate: Path) -> None:
        """Greedy replies of live and candidate on the report's fixed prompts (before / after)."""
        fixed = fixed_report_prompts(self.config.report_prompts)
        if fixed:
            replies = greedy_replies(self.config.base_model, self.config.device,
                                     {"live": live_adapter, "candidate": str(candidate)}, fixed,
                                     self.config.eval_max_new_tokens, self.eval_prompt_tokens())
            self.record_fixed_samples(fixed, replies)

    def eval_prompt_tokens(self) -> int:
        """Longest prompt in greedy evaluation: PPO's length budget minus the reply's."""
        return max(MIN_PROMPT_TOKENS, self.config.ppo.max_length - self.config.eval_max_new_tokens)

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

    def sft_rows(self, rows: list[dict[str, Any]], new: int, *, continued: bool) -> list[dict[str, Any]]:
        """What this round's SFT trains on: every demonstration when the live policy was never fine-tuned;
        else the `new` ones (the newest: exports are oldest first) plus `sft_replay` old ones per new one,
        a random sample, so a round costs what its new data needs without forgetting the old."""
        if not continued or self.config.sft_replay < 0 or new >= len(rows):
            self.metrics["sft_rows"] = {"new": new, "replayed": len(rows) - new, "old": len(rows) - new}
            return rows
        old, fresh = rows[:-new], rows[-new:]
        k = min(len(old), math.ceil(self.config.sft_replay * new))
        replay = random.Random(f"{self.config.seed}-{self.round_id}").sample(old, k)
        self.metrics["sft_rows"] = {"new": new, "replayed": k, "old": len(old)}
        return replay + fresh

    def train_sft(self, sft_path: Path, init_adapter: str | None) -> Path:
        from training.sft import train_sft

        cfg = dataclasses.replace(self.config.sft, base_model=self.config.base_model, device=self.config.device,
                                  data=str(sft_path), output_dir=str(self.work / "sft"), seed=self.config.seed,
                                  init_adapter=init_adapter or "")
        result = train_sft(cfg)
        self.metrics["sft"] = {"steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss,
                               "seconds": result.seconds, "init_adapter": init_adapter or ""}
        return result.adapter_dir

    # -- reward models and the judge --------------------------------------------------------------
    def previous_reward_model(self) -> Any | None:
        """The live reward version before this round, when its adapter is still on disk."""
        previous = self.registry.live("reward")
        if previous and previous.adapter_path and Path(previous.adapter_path).is_dir():
            return previous
        return None

    def held_groups(self, rows: list[dict[str, Any]]) -> list[Any]:
        from training.chat_data import preference_groups

        held = preference_groups(rows)
        if not held:
            raise RoundStop("no held-out preference prompts to judge a reward model on; collect feedback on more prompts.")
        return held

    def fit_reward_model(self, name: str, groups: list[dict[str, Any]], thumbs: list[dict[str, Any]],
                         held: list[Any], reference: Path | None, *, warm: Any | None) -> TrainedRewardModel:
        """Train a reward model on ``groups`` (and ``thumbs``) into ``work/<name>``, warm-started from the
        ``warm`` version if given; score the held-out pairs with it."""
        from feedback_db import write_jsonl
        from training.reward_model import RewardModel, train_reward_model

        c = self.config
        prefs_path = self.data_dir / f"{name}_preferences.jsonl"
        write_jsonl(groups, prefs_path)
        thumbs_path = self.data_dir / f"{name}_thumbs.jsonl"
        if thumbs:
            write_jsonl(thumbs, thumbs_path)
        cfg = dataclasses.replace(c.reward, base_model=c.base_model, device=c.device, data=str(prefs_path),
                                  output_dir=str(self.work / name), seed=c.seed,
                                  init_adapter=warm.adapter_path if warm else "", eval_fraction=0.0,
                                  reference_data=str(reference or ""), thumbs_data=str(thumbs_path) if thumbs else "")
        result = train_reward_model(cfg)
        rm = RewardModel.load(result.adapter_dir, base_model=c.base_model, device=c.device)
        return TrainedRewardModel(result.adapter_dir, name, pairwise_correct(rm, held), result.train_pairs,
                                  result.train_seconds, warm.name if warm else None)

    def train_ppo(self, prompts_path: Path, policy_adapter: str | None, reference: str | None, rm_dir: Path,
                  sft_path: Path | None) -> Any:
        from training.metrics_log import read_metrics
        from training.ppo import train_ppo

        c = self.config
        # The ptx corpus: the demonstrations of this snapshot plus the starter set's, so there are always
        # documents enough to hold some out for the perplexity gate (ppo.split_ptx_documents).
        from feedback_db import read_jsonl, write_jsonl

        documents = list(read_jsonl(sft_path)) if sft_path else []
        documents += starter_rows("sft")
        ptx_path = self.work / "data" / "ptx.jsonl"
        write_jsonl(documents, ptx_path)
        ptx = {"sft_data": "", "pretrain_data": str(ptx_path)}
        # The policy starts from the live policy (or this round's SFT adapter) and is kept near
        # the lineage's SFT adapter: eq. 2's KL is to pi_SFT, however many PPO rounds came since.
        cfg = dataclasses.replace(c.ppo, base_model=c.base_model, device=c.device, prompts=str(prompts_path),
                                  sft_adapter=reference or "", init_adapter=policy_adapter or "",
                                  reward_adapter=str(rm_dir), output_dir=str(self.work / "ppo"), seed=c.seed, **ptx)
        result = train_ppo(cfg, sampler_factory=self.sampler_factory)
        curve = [{"iteration": r.get("step"), "reward": r["reward/mean"], "kl": r["kl/per_reply"]}
                 for r in read_metrics(result.metrics_path) if "reward/mean" in r]
        self.metrics["ppo"] = {"iterations": result.iterations, "reward_first": result.reward_first,
                               "reward_last": result.reward_last, "kl_last": result.kl_last,
                               "ptx_nll_before": result.ptx_nll_before, "ptx_nll_after": result.ptx_nll_after,
                               "seconds": result.seconds, "curve": curve, "start": policy_adapter or "base",
                               "reference": reference or "base"}
        return result

    def register(self, *, policy: Path, reward: Path | None, live: Any, sft: Path | None,
                 reference: str | None = None, promote_reward: bool = False) -> str:
        """Check the adapters load, move them into place, register them and close the round: one transaction.

        ``sft``: this round's SFT adapter when PPO started from it; it is kept beside the policy as
        the KL reference of this lineage's later rounds. ``reward`` is registered, and made the live
        reward model only when ``promote_reward`` (its gates passed): an unvalidated reward model
        never becomes the next round's warm start or judge.
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
        self.step("report")  # books the registration's checks and moves; the commit itself takes milliseconds
        self.write_report("succeeded")
        version_metrics = {k: self.metrics[k] for k in ("mode", "gates", "gates_passed", "auto_promotable", "evaluation",
                                                        "reward_model", "judge", "sft") if k in self.metrics}
        if "ppo" in self.metrics:
            version_metrics["ppo"] = {k: v for k, v in self.metrics["ppo"].items() if k != "curve"}
            version_metrics["reference_adapter"] = reference or ""
            self.metrics["ppo"]["reference"] = reference or "base"
        self.step("commit")
        with self.store.transaction():
            if final_reward is not None:
                rm_gates = {k: g for k, g in self.metrics.get("gates", {}).items() if k.startswith("reward_model")}
                rm_version = self.registry.register(reward_name, kind="reward", adapter_path=str(final_reward),
                                                    base_model=self.base_name, round_id=self.round_id,
                                                    metrics={**self.metrics.get("reward_model", {}), "gates": rm_gates})
                if promote_reward:
                    self.registry.promote(rm_version.id, actor=f"round-{self.round_id}")
            self.registry.register(policy_name, kind="policy", adapter_path=str(final_policy),
                                   base_model=self.base_name, parent_id=live.id, round_id=self.round_id,
                                   metrics=version_metrics)
            self.registry.finish_round(self.round_id, "succeeded", metrics=self.metrics,
                                       report_path=self.report_path())
        return policy_name

