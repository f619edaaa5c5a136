"""Benchmark: does the loop learn? Simulated users with a hidden gold preference, through the real app.

    python scripts/bench_loop.py --tiny --out runs/bench-tiny          # the whole pipeline on a tiny random model (<= 3 min)
    python scripts/bench_loop.py --out runs/bench-rule                 # gold (a), the rule, on Gemma 3 270M
    python scripts/bench_loop.py --out runs/bench-rule2 --round0-adapter runs/bench-rule/rounds/round-0001/adapters/policy-r1
    python scripts/bench_loop.py --out runs/bench-null --null          # users without a preference: must promote nothing
    python scripts/bench_loop.py --train-gold --gold-pairs 400 --rounds 0 --out runs/gold   # train gold (b) once
    ALIGNLOOP_GOLD_RM=runs/gold/gold/rm python scripts/bench_loop.py --gold scripts.gold_preferences:hh_gold_rm --out runs/bench-hh

Only real parts (InstructGPT had labelers; AlpacaFarm, Dubois et al. 2023, showed that methods can be
compared with simulated annotators). The app runs as a child process for the whole run.

The baseline (--baseline). Every gold win rate is measured against one fixed policy:

* ``round0`` (default): the policy users meet out of the box. Before any simulated user acts, round 0
  is made exactly as the product makes it: `alignloop demo` (what `make run` runs) seeds the starter
  set (training/starter/) and serves; `alignloop round --seed-starter` trains on it in a child process
  (SFT on the demonstrations, then reward model and PPO-ptx on the starter preference pairs and
  prompts: the round's own rule decides, see training/round.py); `alignloop promote <name>` (the
  operator's action, whatever the round's gates said) makes it live. Round 0 runs with --round-set
  and then --round0-set (the later setting wins). --round0-adapter PATH reuses a round-0 policy
  adapter trained by an earlier run instead (the starter set is still seeded): it is recorded in the
  registry through feedback_db's ModelRegistry API as a round of its own (metrics say "reused"), with
  its KL reference (the `sft-rN` folder beside a `policy-rN` adapter, else the adapter itself) and
  the demonstrations it stands for, so round 1 neither redoes round 0's SFT nor measures KL to the
  wrong reference; its reward model is not reused (round 1's judge is then a split one).
  Comparing later policies with the bare base would credit the starter set to the users' feedback.
* ``base``: the old behaviour, the policy live when the run starts (the bare base model on a fresh
  database, `alignloop serve`); --seed-starter lets the first users' round import the starter set.

Then rounds 1..N, each:

  1. users: N logged-in users x M actions through gradio_client, as a browser does: chat + 👍/👎 with
     reasons, "write a better reply", Rank, Compare (scripts/simulated_users.py; choices follow the
     gold scorer with Bradley–Terry noise at --noise-temperature);
  2. round: `alignloop round` as a child process (the CLI: SFT -> reward model -> PPO-ptx -> gates ->
     candidate) from the live policy, while the server keeps serving (a user keeps chatting meanwhile);
  3. compare: users vote in Compare battles (the server pits the candidate against live) until
     --compare-votes candidate-vs-live votes or a promotion;
  4. promote: the server's own rule on every vote (`--auto-promote-after`: the sequential test of
     feedback_db/sequential_testing.py, >= 5 distinct voters, each voter's first 20 votes counted),
     then one `alignloop round --promote-only` (whatever rule the CLI has now);
  5. evaluate, offline and seeded: replies of the baseline, live and candidate on held-out prompts no
     user ever sent and no starter-set row contains (round 0 trained on those), drawn as a user of
     the app gets them by default (--eval-sampling app: training.sampling.APP_SAMPLING, the app's
     temperature, top-p, min-p and frequency penalty, --eval-samples per prompt; or greedy), with
     training.evaluation.policy_replies (the transformers stack the round evaluates with); the gold
     scorer judges candidate vs baseline and live vs baseline (win rate over decisive pairs, reply i
     against reply i; 95% interval: Wilson with one reply per prompt, else a bootstrap over prompts;
     ties reported apart); the round's registered reward adapter (the proxy) is scored on the same
     replies: its accuracy on the gold-labelled pairs among them. KL to SFT and ptx perplexity come
     from the round's metrics in the registry. Beside it, the candidate's gold win rate in the
     users' own Compare pairs (their prompts, as sampled for them, without label noise).

The table's row 0 (with --baseline round0) is round 0 itself: no users, its wall time, and its
policy's gold win rate against the bare base (what the starter set bought); rows 1..N show the
candidate and live against round 0. Written to --out (a fresh folder: the run needs a fresh
database): results.json (``baseline`` names the policy every row is judged against), results.md
(the table), gold_win_rate.png (gold win rate against feedback votes), server.log, rounds/ (each
round's log and report).

Targets of the real run (Gemma 3 270M, 2 CPU cores, <= 3 h, gold (a)): the promoted policy wins
>= 60% of gold-judged comparisons against round 0 with a 95% lower bound > 50%; KL within the
round's bound; ptx perplexity within +10%. The null run promotes nothing. Time on the real model:
round 0's SFT on the 301 starter demonstrations is the longest step (about 25 min on 2 CPU cores), and
a users' round with a new demonstration repeats SFT on all demonstrations (the round's rule), so
--round0-set sft.epochs=1 / --round-set sft.epochs=1 and --round0-adapter keep a run within the
budget; the budget check before each round assumes it takes as long as the one before (round 0's
time before round 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chat_app.auth import UsersFile  # noqa: E402
from chat_app.engines.base import SamplingConfig  # noqa: E402
from scripts.server_process import ServerProcess, start_server, stop_server  # noqa: E402
from feedback_db import FeedbackStore, ModelRegistry, wilson_interval  # noqa: E402
from scripts.simulated_users import (  # noqa: E402
    Action,
    GoldScorer,
    NoiseModel,
    SimulatedUser,
    gold_scores,
    mix_weights,
    plan_actions,
)
from training.config import _f  # noqa: E402
from training.evaluation import BOOTSTRAP_RESAMPLES  # noqa: E402
from training.round import heldout_bucket, starter_rows  # noqa: E402
from training.sampling import ReplySampling, evaluation_sampling  # noqa: E402

# Round settings small enough for the tiny model on two CPU cores, with gates any candidate passes
# (--tiny checks that every step runs, not the numbers). Round 0 runs with them too: SFT on the 301
# starter demonstrations in batches of 32, and every users' round with a new demonstration repeats it.
TINY_ROUND_SET = [
    "heldout_fraction=0.3", "min_pairs=4", "min_prompts=3", "rm_floor=-1.0", "rm_tolerance=1.0", "eval_prompts=2",
    "min_rm_eval_pairs=1", "min_eval_prompts=1",
    "eval_max_new_tokens=4", "report_prompts=1", "max_kl=1e9", "min_reward_gain=-1e9", "max_ptx_ppl_increase=1e9",
    "sft.epochs=1", "sft.max_length=96", "sft.batch_size=32", "sft.lora.r=4", "sft.lora.alpha=8",
    "reward.max_length=96", "reward.groups_per_batch=32", "reward.lora.r=4", "reward.lora.alpha=8",
    "ppo.iterations=2", "ppo.rollout_batch=4", "ppo.minibatch=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=4",
    "ppo.max_length=96", "ppo.ptx_batch=2", "ppo.ptx_max_length=64", "ppo.sampler=hf", "ppo.lora.r=4",
    "ppo.lora.alpha=8",
]


@dataclass
class BenchLoopConfig:
    """One benchmark run; every field is a command-line option (--rounds 3, --round-set ppo.iterations=8)."""

    out: str = _f("runs/bench-loop", "A folder for everything this run writes (the database, logs, results).")
    base_model: str = _f("default", "Base model of the app and the rounds: 'default' (embedded Gemma 3 270M), a folder or an HF id.")
    engine: str = _f("auto", "The app's engine: auto (vLLM when importable) | vllm | hf.")
    device: str = _f("auto", "Device of the offline evaluation (replies, proxy and gold reward models).")
    gold: str = _f("scripts.gold_preferences:rule_gold", "The hidden preference: package.module:function(prompt, reply) -> float.")
    null: bool = _f(False, "Users without a preference: every vote, thumb and ranking a coin flip (must promote nothing).")
    noise_temperature: float = _f(0.5, "Bradley–Terry temperature T in gold units: P(A over B) = sigmoid((g(A) - g(B)) / T).")
    thumbs_threshold: float = _f(float("nan"), "Gold score at which 👍 and 👎 are equally likely (nan: the gold's own `threshold`, else 0).")
    baseline: str = _f("round0", "What the gold win rates are against: round0 (the starter-set round, trained and promoted before any user acts) | base (the bare base model live at the start).")
    round0_set: list = _f([], "`alignloop round --set` overrides for round 0 only, applied after --round-set, e.g. sft.epochs=1 (repeatable).")
    round0_adapter: str = _f("", "Reuse this round-0 policy adapter folder (e.g. an earlier run's rounds/round-0001/adapters/policy-r1) instead of training round 0.")
    rounds: int = _f(3, "Retraining rounds by the users (after round 0).")
    users: int = _f(6, "Simulated users (logged in, acting concurrently); promotion needs votes from several (the test's min_voters, 5).")
    actions: int = _f(10, "Actions per user per round, before the round trains.")
    action_mix: str = _f("chat:3,demonstrate:1,rank:2,compare:2", "Relative frequency of each action (chat, demonstrate, rank, compare).")
    actions_during_round: int = _f(2, "Chat actions one user takes while the round trains (the server keeps serving).")
    best_of: int = _f(3, "Replies a user sees (Regenerate) before saving the best as its better reply.")
    rank_k: int = _f(4, "Replies per Rank action.")
    compare_votes: int = _f(120, "Candidate-vs-live Compare votes collected after each round (fewer if promoted first); the promotion test counts each voter's first 20, so more than users x 20 adds nothing.")
    auto_promote_after: int = _f(10, "The server's --auto-promote-after (and the --promote-only min_votes): counted decisive votes before the promotion test may promote.")
    max_new_tokens: int = _f(64, "The app's reply length limit, as users set it.")
    temperature: float = _f(SamplingConfig.temperature, "The app's sampling temperature, as users set it (default: the app's).")
    top_p: float = _f(SamplingConfig.top_p, "The app's top-p, as users set it (default: the app's).")
    eval_prompts: int = _f(64, "Held-out prompts (never sent by a user) for the gold win rates and the proxy's accuracy.")
    eval_fraction: float = _f(0.5, "Share of the prompt pool (by hash) kept away from the users for evaluation (starter-set prompts never are: round 0 trained on them).")
    eval_max_new_tokens: int = _f(64, "Longest reply in the offline evaluation.")
    eval_sampling: str = _f("app", "How the offline evaluation draws replies: app (what a user of the app gets by default: training.sampling.APP_SAMPLING, --eval-samples per prompt) | greedy (one per prompt).")
    eval_samples: int = _f(4, "Replies per held-out prompt and version with --eval-sampling app (paired sample by sample; the interval resamples prompts).")
    round_set: list = _f([], "`alignloop round --set` overrides for every round, e.g. ppo.iterations=16 (repeatable).")
    seed_starter: bool = _f(False, "With --baseline base: let the first users' round import the starter set (its preferences are not the gold's).")
    budget_minutes: float = _f(180.0, "Stop before a round that would end after this much wall time (a running round is stopped at it).")
    seed: int = _f(0, "Seed of the users' choices and plans.")
    train_gold: bool = _f(False, "First train gold (b), the HH reward model, into OUT/gold and use it (ALIGNLOOP_GOLD_RM).")
    gold_rm: str = _f("", "Folder of a trained gold reward model for hh_gold_rm (sets ALIGNLOOP_GOLD_RM).")
    gold_pairs: int = _f(400, "HH pairs (gold part) the gold reward model trains on (CPU: ~0.2-0.9 pairs/s).")
    gold_max_length: int = _f(384, "Prompt + reply tokens for the gold reward model.")
    tiny: bool = _f(False, "Smoke run on a tiny random model with the transformers engine: round 0 and 2 rounds, few actions (checks the steps, not the numbers).")


def apply_tiny(cfg: BenchLoopConfig) -> BenchLoopConfig:
    """The --tiny settings: build the tiny random model into OUT and shrink every step, round 0 included
    (TINY_ROUND_SET is part of --round-set, which round 0 runs with too; the gold stays --gold's: the
    rule by default)."""
    from training.base_models import build_tiny_model

    model = Path(cfg.out) / "tiny-model"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    return dataclasses.replace(
        cfg, base_model=str(model), engine="hf", device="cpu",
        rounds=2, users=2, actions=5, actions_during_round=1, best_of=2, rank_k=3, compare_votes=3,
        auto_promote_after=3, max_new_tokens=8, eval_prompts=6, eval_max_new_tokens=8, eval_samples=2, budget_minutes=8.0,
        round_set=TINY_ROUND_SET + ["device=cpu"] + list(cfg.round_set))


# --------------------------------------------------------------------------- #
# Gold scorers and prompts
# --------------------------------------------------------------------------- #


def load_gold(spec: str) -> GoldScorer:
    """The scorer named 'package.module:function'."""
    module, sep, name = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"--gold takes package.module:function, not {spec!r} (e.g. scripts.gold_preferences:rule_gold).")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise SystemExit(f"{module} has no function {name!r}.")
    return fn


def starter_prompt_texts() -> set[str]:
    """Every prompt text in the starter set's training files (demonstrations, prompts, preference pairs),
    user turns of message-list prompts included: round 0 trains on all of them."""
    texts: set[str] = set()
    for kind in ("sft", "prompts", "preferences"):
        for row in starter_rows(kind):
            prompt = row.get("prompt")
            if isinstance(prompt, str):
                texts.add(prompt)
            elif isinstance(prompt, list):
                texts.update(m["content"] for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str))
    return texts


def split_prompts(prompts: list[str], eval_fraction: float, eval_n: int,
                  trained: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(users' prompts, evaluation prompts) by a salted hash of the text: an evaluation prompt is never
    sent by a user, so neither the proxy reward model nor the policy ever trains on it. A prompt in
    `trained` (the starter set's, which round 0 trains on) is never an evaluation prompt."""
    held = sorted((p for p in prompts if p not in trained and heldout_bucket(["eval", p]) < eval_fraction),
                  key=lambda p: heldout_bucket(["eval", p]))
    users = [p for p in prompts if p in trained or heldout_bucket(["eval", p]) >= eval_fraction]
    if not users or not held:
        raise SystemExit(f"{len(prompts)} prompts split into {len(users)} for users and {len(held)} for evaluation; "
                         "use a larger prompt pool or another --eval-fraction.")
    return users, held[:eval_n]


def gold_prompt_split(cfg: BenchLoopConfig, gold: GoldScorer) -> tuple[list[str], list[str]]:
    """(users' prompts, evaluation prompts) of the gold's own prompt pool (``gold.prompts()``; the rule's
    otherwise), split by `split_prompts` with the run's --eval-fraction and --eval-prompts."""
    pool = getattr(gold, "prompts", None)
    if pool is None:
        from scripts.gold_preferences import rule_prompts as pool
    return split_prompts(list(pool()), cfg.eval_fraction, cfg.eval_prompts, starter_prompt_texts())


# --------------------------------------------------------------------------- #
# Statistics (each written once)
# --------------------------------------------------------------------------- #


def gold_win_rate(scores: list[list[float]], baseline: list[list[float]]) -> dict[str, Any]:
    """Gold-judged head-to-head on the same prompts: a win when g(reply) > g(baseline reply), reply i of a
    prompt against the baseline's reply i (``scores[p][i]`` vs ``baseline[p][i]``).

    rate = wins / (wins + losses); ties count for neither side and are reported. The 95% interval: with one
    pair per prompt, Wilson's (feedback_db.wilson_interval, the same statistic as the app's Compare win
    rate); with several, a percentile bootstrap that resamples prompts (the pairs of one prompt are not
    independent, so counting them as such would give too narrow an interval).
    """
    pairs = [[(a > b) - (a < b) for a, b in zip(row, base)] for row, base in zip(scores, baseline)]
    wins = np.array([sum(x > 0 for x in row) for row in pairs], dtype=np.float64)
    decisive = np.array([sum(x != 0 for x in row) for row in pairs], dtype=np.float64)
    n = int(decisive.sum())
    out: dict[str, Any] = {"wins": int(wins.sum()), "losses": n - int(wins.sum()),
                           "ties": sum(len(row) for row in pairs) - n, "rate": wins.sum() / n if n else None,
                           "ci_low": None, "ci_high": None, "prompts": len(pairs)}
    if not n:
        return out
    if all(len(row) == 1 for row in pairs):
        out["ci_low"], out["ci_high"] = wilson_interval(out["wins"], n)
        return out
    idx = np.random.default_rng(0).integers(0, len(pairs), size=(BOOTSTRAP_RESAMPLES, len(pairs)))
    w, d = wins[idx].sum(axis=1), decisive[idx].sum(axis=1)
    rates = w[d > 0] / d[d > 0]
    out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(rates, [0.025, 0.975]))
    out["interval"] = "bootstrap over prompts"
    return out


def compare_gold(votes: list[Action], candidate: str) -> dict[str, Any]:
    """The candidate's gold win rate in the users' own Compare pairs (their prompts, their sampling),
    without the label noise: a win when g(candidate's reply) > g(the other's); plus the votes they cast.
    What the promotion test sees, next to the held-out figure."""
    pairs = [(a.gold if a.versions[0] == candidate else a.gold[::-1]) for a in votes if a.gold is not None]
    out = gold_win_rate([[c] for c, _ in pairs], [[o] for _, o in pairs])
    voted = [a for a in votes if a.choice in ("A", "B")]
    out["voted_for"] = sum(a.versions["AB".index(a.choice)] == candidate for a in voted)
    out["voted_against"] = len(voted) - out["voted_for"]
    return out


def proxy_accuracy(proxy: list[list[float]], gold: list[list[float]]) -> dict[str, Any]:
    """Pairwise accuracy of the proxy reward model on gold-labelled pairs: for every prompt, every pair
    of its replies whose gold scores differ; correct when the proxy orders them the same way (a proxy
    tie is wrong, as in training.round.reward_accuracy). 95% Wilson interval."""
    correct = total = 0
    for p_row, g_row in zip(proxy, gold):
        for i in range(len(g_row)):
            for j in range(i + 1, len(g_row)):
                if g_row[i] != g_row[j]:
                    total += 1
                    correct += (p_row[i] - p_row[j]) * (g_row[i] - g_row[j]) > 0
    low, high = wilson_interval(correct, total) if total else (None, None)
    return {"correct": correct, "pairs": total, "accuracy": correct / total if total else None,
            "ci_low": low, "ci_high": high}


# --------------------------------------------------------------------------- #
# The registry (through feedback_db's API, read-only)
# --------------------------------------------------------------------------- #


def registry_read(db: Path, read: Callable[[ModelRegistry], Any]) -> Any:
    """`read(registry)` on a short-lived connection (the server and the rounds write meanwhile)."""
    with FeedbackStore(db, create=False) as store:
        return read(ModelRegistry(store))


def round_summary(db: Path, round_id: int) -> dict[str, Any]:
    """What the table needs from a round's registry record; read defensively (the metrics' format changes)."""
    record = registry_read(db, lambda r: r.get_round(round_id))
    m, c = record.metrics, record.config
    ev = m.get("evaluation") or {}
    gates = m.get("gates") or {}
    verdicts = {name: (g.get("verdict") if isinstance(g, dict) else g) for name, g in gates.items()}
    kl_gate = gates.get("kl") if isinstance(gates.get("kl"), dict) else {}
    return {
        "round_id": round_id, "status": record.status, "reason": m.get("reason", ""), "mode": m.get("mode"),
        "candidate": m.get("candidate"), "data": m.get("data", {}),
        "kl_to_sft": ev.get("kl_to_reference", kl_gate.get("value")), "max_kl": c.get("max_kl"),
        "ptx_ppl_before": ev.get("ptx_ppl_before"), "ptx_ppl_after": ev.get("ptx_ppl_after"),
        "ptx_ppl_increase": ev.get("ptx_ppl_increase"), "max_ptx_ppl_increase": c.get("max_ptx_ppl_increase"),
        "reward_gain": ev.get("reward_gain"), "gates": verdicts, "gates_passed": m.get("gates_passed"),
        "auto_promotable": m.get("auto_promotable"),
        "rm_heldout_accuracy": (m.get("reward_model") or {}).get("eval_accuracy"),
    }


def reward_adapter_of(db: Path, round_id: int) -> str | None:
    """The reward adapter the round registered (the proxy), if it trained one."""
    versions = registry_read(db, lambda r: r.list("reward"))
    return next((v.adapter_path for v in versions if v.round_id == round_id), None)


# --------------------------------------------------------------------------- #
# The steps of a round
# --------------------------------------------------------------------------- #


@dataclass
class Users:
    """The simulated users and the prompts they write."""

    users: list[SimulatedUser]
    prompts: list[str]
    mix: dict[str, float]
    rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prompt(self) -> str:
        with self.lock:
            return self.rng.choice(self.prompts)


def users_phase(users: Users, actions: int, deadline: float) -> list[Action]:
    """Each user takes `actions` actions, all users at once; one plan for all of them has every action
    of the mix at least once (when there are enough actions). Returns what they did."""
    n = len(users.users)
    plan = plan_actions(users.mix, actions * n, users.rng)

    def run(i: int) -> list[Action]:
        user, done = users.users[i], []
        for kind in plan[i::n]:
            if time.monotonic() > deadline:
                break
            done.append(user.act(kind, users.prompt()))
        return done

    with ThreadPoolExecutor(n) as pool:
        return [a for batch in pool.map(run, range(n)) for a in batch]


def round_command(cfg: BenchLoopConfig, db: Path, *extra: str, sets: list[str] | None = None) -> list[str]:
    """`alignloop round` on the run's database and base model with `sets` (default: --round-set) as --set."""
    cmd = [sys.executable, "-m", "chat_app.cli", "round", "--db", str(db), "--base-model", cfg.base_model,
           "--rounds-dir", str(Path(cfg.out) / "rounds")]
    for item in cfg.round_set if sets is None else sets:
        cmd += ["--set", item]
    return cmd + list(extra)


def run_round(cfg: BenchLoopConfig, db: Path, index: int, users: Users | None, deadline: float, *extra: str,
              sets: list[str] | None = None) -> tuple[int, str, list[Action]]:
    """`alignloop round` in a child process while one user keeps chatting (none when `users` is None);
    (exit code, output, actions). Stopped at `deadline`."""
    log = Path(cfg.out) / "rounds" / f"bench-round-{index}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(round_command(cfg, db, *extra, sets=sets), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        actions: list[Action] = []
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.terminate()  # recorded as stopped by the round itself; nothing registered
                    proc.wait(timeout=300)  # the real model may take a while to write its report
                    break
                if users is not None and len(actions) < cfg.actions_during_round:
                    actions.append(users.users[0].act("chat", users.prompt()))
                else:
                    time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text(errors="replace"), actions


def new_round_summary(db: Path, before: list[int], code: int, output: str) -> dict[str, Any]:
    """The summary of the round recorded after `before` (the registry's round ids then), or 'skipped'."""
    new = [x.id for x in registry_read(db, lambda r: r.rounds()) if x.id not in before]
    summary = round_summary(db, new[-1]) if new else {"status": "skipped", "reason": output.strip()[-300:]}
    if summary["status"] == "running" and code != 0:
        # Killed before it could record how it ended (SIGKILL, the OOM killer): the registry marks it
        # interrupted only when the next round starts. The table says what happened to the process.
        summary["status"] = f"killed (exit {code})"
    summary["exit_code"] = code
    return summary


def promote_version(db: Path, name: str) -> str:
    """`alignloop promote NAME`: the operator makes a version live (the server follows within a second)."""
    cmd = [sys.executable, "-m", "chat_app.cli", "promote", name, "--db", str(db), "--actor", "operator"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"`alignloop promote {name}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


def wait_until_serving(server: ServerProcess, name: str, timeout: float = 900.0) -> None:
    """Wait until the app has loaded version `name` (its log says `serving NAME`) and its registry poll
    (every 0.25 s, chat_app/router.py) has had time to switch to it. Loading an adapter into vLLM on
    the real model can take minutes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_path.read_text(errors="replace")
        if f"cannot serve {name}:" in text:
            raise RuntimeError(f"the app cannot load {name}; its log ends with:\n{server.log()}")
        if f"serving {name} (" in text:
            time.sleep(1.0)
            return
        if server.process.poll() is not None:
            raise RuntimeError(f"the app exited; its log ends with:\n{server.log()}")
        time.sleep(0.5)
    raise RuntimeError(f"the app had not loaded {name} after {timeout:.0f} s; its log ends with:\n{server.log()}")


def register_round0_adapter(cfg: BenchLoopConfig, db: Path) -> tuple[str, dict[str, Any]]:
    """Record --round0-adapter in the registry (feedback_db's ModelRegistry API) as round 0 would have.

    One recorded round (metrics: ``reused_adapter``, ``sft_demonstrations`` = the demonstrations in
    the database now, i.e. the starter set's, so round 1 does not repeat round 0's SFT) and one
    policy candidate descending from the bare base, whose ``reference_adapter`` (the KL reference
    of later rounds) is the `sft-rN` folder beside a `policy-rN` adapter, else the adapter itself
    (an SFT-only round 0). Returns (version name, round summary)."""
    from feedback_db import export_sft
    from training.round import check_adapter

    path = Path(cfg.round0_adapter).expanduser().resolve()
    try:
        check_adapter(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--round0-adapter {path} is not a complete LoRA adapter folder ({exc}); pass the "
                         "policy folder of an earlier round 0, e.g. OUT/rounds/round-0001/adapters/policy-r1.") from None
    sibling = path.parent / ("sft-" + path.name[len("policy-"):]) if path.name.startswith("policy-") else None
    reference = sibling if sibling is not None and sibling.is_dir() else path
    mode = "sft-only" if reference == path else "sft+rm+ppo"
    with FeedbackStore(db, create=False) as store:
        registry = ModelRegistry(store)
        base = registry.live("policy")
        snapshot = store.snapshot()
        demonstrations = len(export_sft(store, snapshot).rows)
        record = registry.start_round({"base_model": cfg.base_model, "reused_round0_adapter": str(path)}, snapshot)
        name = f"round0-{path.name}"
        registry.register(name, kind="policy", adapter_path=str(path), base_model=base.base_model,
                          parent_id=base.id, round_id=record.id, actor="operator",
                          metrics={"mode": mode, "reference_adapter": str(reference), "reused_adapter": str(path)})
        registry.finish_round(record.id, "succeeded", metrics={
            "mode": mode, "candidate": name, "sft_demonstrations": demonstrations, "reused_adapter": str(path),
            "reason": f"round-0 adapter reused from {path} (not trained in this run)", "gates": {}})
    return name, round_summary(db, record.id)


def compare_phase(cfg: BenchLoopConfig, db: Path, users: Users, candidate: str, deadline: float) -> list[Action]:
    """Compare battles by all users until `compare_votes` candidate-vs-live votes, or a promotion.

    Battles that start before the server has loaded the candidate are live vs live: real votes that
    count as signals, not as candidate votes. At most 3 x compare_votes + 10 battles in all.
    """
    counted, battles, stop = [0], [0], threading.Event()
    limit = 3 * cfg.compare_votes + 10

    def run(user: SimulatedUser) -> list[Action]:
        done = []
        while not stop.is_set() and time.monotonic() < deadline:
            with users.lock:
                if battles[0] >= limit:
                    break
                battles[0] += 1
            action = user.act("compare", users.prompt())
            done.append(action)
            with users.lock:
                if action.versions and candidate in action.versions and len(set(action.versions)) == 2:
                    counted[0] += 1
                if counted[0] >= cfg.compare_votes or live_policy(db) == candidate:
                    stop.set()
        return done

    with ThreadPoolExecutor(len(users.users)) as pool:
        return [a for batch in pool.map(run, users.users) for a in batch]


def live_policy(db: Path) -> str | None:
    live = registry_read(db, lambda r: r.live("policy"))
    return live.name if live else None


def promote_only(cfg: BenchLoopConfig, db: Path) -> str:
    """`alignloop round --promote-only`: the CLI's current promotion rule gets the last word."""
    cmd = round_command(cfg, db, "--promote-only", "--set", "auto_promote=true",
                        "--set", f"min_votes={cfg.auto_promote_after}")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"`alignloop round --promote-only` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def eval_sampling(cfg: BenchLoopConfig) -> ReplySampling:
    """--eval-sampling: the app's default sampling with --eval-samples per prompt, or greedy."""
    try:
        return evaluation_sampling(cfg.eval_sampling, cfg.eval_samples)
    except ValueError as exc:
        raise SystemExit(f"--eval-sampling / --eval-samples: {exc}") from None


@dataclass
class Evaluator:
    """Each version's replies on the held-out prompts (``--eval-sampling``: several per prompt as the app
    samples them, or one greedy; cached by version) and their gold scores, ``[prompt][sample]``."""

    cfg: BenchLoopConfig
    gold: GoldScorer
    prompts: list[str]
    replies: dict[str, list[list[str]]] = field(default_factory=dict)
    ended: dict[str, list[list[bool]]] = field(default_factory=dict)  # False: cut off at the token limit
    scores: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def sampling(self) -> ReplySampling:
        return eval_sampling(self.cfg)

    def ensure(self, versions: dict[str, str | None]) -> None:
        """Replies (training.evaluation.policy_replies: one base in memory, the same seeded random stream
        for every version) of versions not seen yet."""
        from training.evaluation import policy_replies

        missing = {name: path for name, path in versions.items() if name not in self.replies}
        if missing:
            out = policy_replies(self.cfg.base_model, self.cfg.device, missing, self.prompts,
                                 self.cfg.eval_max_new_tokens, sampling=self.sampling)
            self.ended.update(out.ended)
            for name, rows in out.texts.items():
                self.replies[name] = rows
                k = len(rows[0]) if rows else 0
                flat = gold_scores(self.gold, [p for p in self.prompts for _ in range(k)],
                                   [text for row in rows for text in row])
                self.scores[name] = [flat[i * k:(i + 1) * k] for i in range(len(rows))]

    def mean_gold(self, name: str) -> float:
        flat = [x for row in self.scores[name] for x in row]
        return sum(flat) / len(flat)

    def proxy(self, adapter: str, names: list[str]) -> dict[str, Any]:
        """The proxy reward model's accuracy on gold-labelled pairs among these versions' replies (the
        versions' i-th replies to one prompt form a group)."""
        from training.reward_model import RewardModel

        rm = RewardModel.load(adapter, base_model=self.cfg.base_model, device=self.cfg.device)
        names = list(dict.fromkeys(names))
        k = len(self.replies[names[0]][0]) if self.prompts else 0
        prompts = [p for p in self.prompts for _ in range(k)]
        proxy = {n: rm.score(prompts, [t for row in self.replies[n] for t in row],
                             [e for row in self.ended[n] for e in row]) for n in names}
        gold = {n: [x for row in self.scores[n] for x in row] for n in names}
        rows = list(range(len(prompts)))
        return proxy_accuracy([[proxy[n][i] for n in names] for i in rows], [[gold[n][i] for n in names] for i in rows])


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


def count_signals(actions: list[Action]) -> dict[str, int]:
    """Chat turns, thumbs, Compare votes (and candidate-vs-live ones), rankings, demonstrations."""
    signals = {
        "chat_turns": sum(a.chat_turns for a in actions),
        "thumbs_up": sum(a.thumbs > 0 for a in actions),
        "thumbs_down": sum(a.thumbs < 0 for a in actions),
        "compare_votes": sum(a.compare_votes for a in actions),
        "rankings": sum(a.rankings for a in actions),
        "demonstrations": sum(a.demonstrations for a in actions),
    }
    signals["votes"] = (signals["thumbs_up"] + signals["thumbs_down"] + signals["compare_votes"]
                        + signals["rankings"] + signals["demonstrations"])
    return signals


def make_users(cfg: BenchLoopConfig, url: str, passwords: dict[str, str], gold: GoldScorer,
               prompts: list[str]) -> Users:
    from gradio_client import Client

    threshold = cfg.thumbs_threshold if not math.isnan(cfg.thumbs_threshold) else getattr(gold, "threshold", 0.0)
    noise = NoiseModel(math.inf if cfg.null else cfg.noise_temperature, threshold)
    sampling = ("", cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    reasons = None if cfg.null else getattr(gold, "reasons", None)
    edit = None if cfg.null else getattr(gold, "edit", None)  # a user without a preference saves replies as they are
    users = [SimulatedUser(name, Client(url, auth=(name, pw), verbose=False), gold, noise,
                           random.Random(f"{cfg.seed}-{name}"), sampling, cfg.best_of, cfg.rank_k, reasons, edit)
             for name, pw in passwords.items()]
    return Users(users, prompts, mix_weights(cfg.action_mix), random.Random(cfg.seed))


def check_options(cfg: BenchLoopConfig) -> None:
    """Refuse option combinations that would not mean what they say."""
    if cfg.baseline not in ("round0", "base"):
        raise SystemExit(f"--baseline takes round0 or base, not {cfg.baseline!r}.")
    if cfg.baseline == "base" and (cfg.round0_set or cfg.round0_adapter):
        raise SystemExit("--round0-set and --round0-adapter need --baseline round0 (with base no round 0 is made).")
    if cfg.baseline == "round0" and cfg.seed_starter:
        raise SystemExit("--seed-starter is for --baseline base: with round0 the starter set is seeded and trained on "
                         "(round 0) before any user acts.")
    eval_sampling(cfg)
    if cfg.eval_samples < 1:
        raise SystemExit(f"--eval-samples {cfg.eval_samples}: draw at least 1 reply per prompt.")


def run_bench(cfg: BenchLoopConfig) -> dict[str, Any]:
    """Run the whole benchmark (see the module docstring); write and return the results."""
    check_options(cfg)
    started = time.monotonic()
    deadline = started + cfg.budget_minutes * 60
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.rounds > 0 and (out / "feedback.db").exists():
        raise SystemExit(f"{out / 'feedback.db'} exists from an earlier run; the benchmark needs a fresh database: "
                         "pass another --out (reuse that run's round 0 with --round0-adapter).")
    if cfg.train_gold:
        from scripts.gold_preferences import GOLD_RM_ENV, train_hh_gold_rm

        t = time.monotonic()
        cfg.gold_rm = str(train_hh_gold_rm(out / "gold", pairs=cfg.gold_pairs, base_model=cfg.base_model,
                                           max_length=cfg.gold_max_length, device=cfg.device, seed=cfg.seed))
        print(f"gold reward model: {cfg.gold_rm} ({time.monotonic() - t:.0f} s; see {out / 'gold' / 'gold_rm.json'})")
        os.environ[GOLD_RM_ENV] = cfg.gold_rm
    elif cfg.gold_rm:
        os.environ["ALIGNLOOP_GOLD_RM"] = cfg.gold_rm
    gold = load_gold(cfg.gold)
    gold_scores(gold, ["Say hello."], ["Hello."])  # fails now, with its message, if the gold cannot score
    user_prompts, eval_prompts = gold_prompt_split(cfg, gold)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "prompts": {"users": len(user_prompts),
                               "eval": len(eval_prompts)}, "eval_sampling": eval_sampling(cfg).describe(),
                               "rounds": [], "stopped": None}
    if cfg.rounds <= 0:
        results["wall_seconds"] = time.monotonic() - started
        return write_results(out, results)

    passwords = {f"user{i}": f"pw-{i}-{random.Random(cfg.seed + i).getrandbits(32):08x}" for i in range(cfg.users)}
    users_file = UsersFile(out / "users.json")  # passwords never go on the server's command line
    for name, password in passwords.items():
        users_file.add(name, password, replace=True)
    # `alignloop demo` is `serve` after seeding the starter set (what `make run` runs); --bare-base: round 0
    # is trained below as a whole round (or reused), not as demo's quick first-run version.
    demo = cfg.baseline == "round0"
    server = start_server(cfg.base_model, out, engine=cfg.engine, timeout=900.0,
                          command="demo" if demo else "serve", serve_args=[*(["--bare-base"] if demo else []),
                              "--max-new-tokens", str(cfg.max_new_tokens), "--rate-limit", "0",
                              "--auto-promote-after", str(cfg.auto_promote_after),
                              "--users-file", str(users_file.path)])
    try:
        db = server.db_path
        base = registry_read(db, lambda r: r.live("policy"))  # the bare base model on a fresh database
        evaluator = Evaluator(cfg, gold, eval_prompts)
        last_round_s = 0.0
        if cfg.baseline == "round0":
            row = round_zero(cfg, server, evaluator, base.name, deadline)
            row["cumulative_votes"] = 0
            results["rounds"].append(row)
            print_table(results["rounds"])
            baseline = row["live_after"]
            last_round_s = sum(row["seconds"].values())  # the first users' round is guessed to take as long
        else:
            t = time.monotonic()
            evaluator.ensure({base.name: base.adapter_path})
            results["baseline_eval_seconds"] = time.monotonic() - t
            baseline = base.name
        results["baseline"] = {"mode": cfg.baseline, "policy": baseline, "base": base.name}
        results["round0_policy"] = baseline
        write_results(out, results)
        users = make_users(cfg, server.url, passwords, gold, user_prompts)
        votes_so_far = 0
        for index in range(1, cfg.rounds + 1):
            if time.monotonic() + last_round_s > deadline:
                results["stopped"] = f"budget: round {index} would end after --budget-minutes {cfg.budget_minutes}"
                break
            row = one_round(cfg, server, users, evaluator, baseline, index, deadline)
            votes_so_far += row["signals"]["votes"]
            row["cumulative_votes"] = votes_so_far
            last_round_s = sum(row["seconds"].values())
            results["rounds"].append(row)
            print_table(results["rounds"])
            write_results(out, results)
            if server.process.poll() is not None:
                raise RuntimeError(f"the app exited during the run; its log ends with:\n{server.log()}")
    finally:
        stop_server(server)
    promoted = [r["promoted"] for r in results["rounds"] if r["promoted"] and r["round"] > 0]
    if cfg.null:
        results["null_check"] = "passed: nothing promoted" if not promoted else f"FAILED: promoted {promoted}"
    results["wall_seconds"] = time.monotonic() - started
    return write_results(out, results)


def round_zero(cfg: BenchLoopConfig, server: ServerProcess, evaluator: Evaluator, base: str,
               deadline: float) -> dict[str, Any]:
    """Round 0 as the product makes it, before any user acts: `alignloop round --seed-starter` (or
    --round0-adapter registered), then `alignloop promote` by the operator; evaluated against the bare
    base `base`. Row 0 of the table."""
    db, seconds = server.db_path, {"users": 0.0, "compare": 0.0}
    t = time.monotonic()
    if cfg.round0_adapter:
        name, summary = register_round0_adapter(cfg, db)
        summary["exit_code"] = 0
    else:
        before = registry_read(db, lambda r: [x.id for x in r.rounds()])
        code, output, _ = run_round(cfg, db, 0, None, deadline, "--seed-starter", sets=cfg.round_set + cfg.round0_set)
        summary = new_round_summary(db, before, code, output)
        name = summary.get("candidate") if summary["status"] == "succeeded" else None
        if not name:
            raise SystemExit(
                f"round 0 (the starter set) ended {summary['status']}: {summary.get('reason', '')}\n"
                f"See {Path(cfg.out) / 'rounds' / 'bench-round-0.log'}. Change it with --round0-set, reuse an earlier "
                "round 0 with --round0-adapter, or compare with the bare base (--baseline base).")
    seconds["round"] = time.monotonic() - t
    t = time.monotonic()
    message = promote_version(db, name)
    wait_until_serving(server, name)
    seconds["promote"] = time.monotonic() - t
    t = time.monotonic()
    evaluator.ensure({base: None, name: registry_read(db, lambda r: r.get(name).adapter_path)})
    win = gold_win_rate(evaluator.scores[name], evaluator.scores[base])
    reward = reward_adapter_of(db, summary["round_id"])
    proxy = evaluator.proxy(reward, [base, name]) if reward else None
    seconds["evaluate"] = time.monotonic() - t
    return {
        "round": 0, "round_id": summary.get("round_id"), "status": summary["status"],
        "reason": summary.get("reason", ""), "candidate": name, "live_before": base, "live_after": live_policy(db),
        "promoted": name, "promotion_cli": message, "reused_adapter": cfg.round0_adapter or None,
        "signals": {**count_signals([]), "candidate_votes": 0}, "round_metrics": summary,
        "gold_win_rate": {"against": base, "candidate": win, "live": win}, "proxy_accuracy": proxy,
        "mean_gold": {n: evaluator.mean_gold(n) for n in (base, name)},
        "seconds": seconds,
    }


def one_round(cfg: BenchLoopConfig, server: ServerProcess, users: Users, evaluator: Evaluator, baseline: str,
              index: int, deadline: float) -> dict[str, Any]:
    """Users act, a round trains, Compare votes, promotion decides, evaluation against `baseline`; one row."""
    db, seconds, actions = server.db_path, {}, []
    t = time.monotonic()
    actions += users_phase(users, cfg.actions, deadline)
    seconds["users"] = time.monotonic() - t

    before = registry_read(db, lambda r: [x.id for x in r.rounds()])
    t = time.monotonic()
    extra = ["--seed-starter"] if cfg.seed_starter and index == 1 else []
    code, output, during = run_round(cfg, db, index, users, deadline, *extra)
    actions += during
    seconds["round"] = time.monotonic() - t
    summary = new_round_summary(db, before, code, output)
    candidate = summary.get("candidate") if summary.get("status") == "succeeded" else None

    live_before = live_policy(db)
    t = time.monotonic()
    if candidate:
        actions += compare_phase(cfg, db, users, candidate, deadline)
    seconds["compare"] = time.monotonic() - t
    t = time.monotonic()
    promote_message = promote_only(cfg, db)
    seconds["promote"] = time.monotonic() - t
    live_after = live_policy(db)

    t = time.monotonic()
    versions = registry_read(db, lambda r: {v.name: v.adapter_path for v in r.list("policy")})
    evaluator.ensure({n: versions[n] for n in {live_after, candidate} if n})
    win = {"against": baseline, "live": gold_win_rate(evaluator.scores[live_after], evaluator.scores[baseline])}
    if candidate:
        win["candidate"] = gold_win_rate(evaluator.scores[candidate], evaluator.scores[baseline])
    adapter = reward_adapter_of(db, summary["round_id"]) if "round_id" in summary else None
    proxy = evaluator.proxy(adapter, [baseline, live_after] + ([candidate] if candidate else [])) if adapter else None
    seconds["evaluate"] = time.monotonic() - t
    candidate_votes = [a for a in actions if a.versions and candidate in a.versions and len(set(a.versions)) == 2]
    return {
        "round": index, "round_id": summary.get("round_id"), "status": summary["status"],
        "reason": summary.get("reason", ""), "candidate": candidate, "live_before": live_before,
        "live_after": live_after, "promoted": live_after if live_after != live_before else None,
        "promotion_cli": promote_message, "signals": {**count_signals(actions),
                                                      "candidate_votes": len(candidate_votes)},
        "round_metrics": summary, "gold_win_rate": win, "proxy_accuracy": proxy,
        "compare_gold": compare_gold(candidate_votes, candidate) if candidate else None,
        "mean_gold": {n: evaluator.mean_gold(n) for n in evaluator.scores if n in (baseline, live_after, candidate)},
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- #
# Output: the table, results.json / results.md, the plot
# --------------------------------------------------------------------------- #


def _rate(w: dict[str, Any] | None) -> str:
    if not w or w.get("rate") is None:
        return "—"
    key = "rate" if "rate" in w else "accuracy"
    return f"{w[key]:.0%} [{w['ci_low']:.0%}, {w['ci_high']:.0%}]"


def _pairs(g: dict[str, Any] | None) -> str:
    """The compare_gold cell: rate [interval] (votes for-against)."""
    return "—" if not g else f"{_rate(g)} ({g['voted_for']}-{g['voted_against']})"


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not math.isnan(value) else "—"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The per-round table as Markdown. Row 0 (round 0) is judged against the bare base, later rows
    against the baseline (each row's ``gold_win_rate["against"]``)."""
    head = ("| round | status | chat | 👍/👎 | compare (cand.) | rank | demos | votes | proxy RM acc. | "
            "cand. gold win vs baseline | cand. gold win in users' Compare pairs (votes for-against) | "
            "live gold win vs baseline | KL to SFT (max) | ptx ppl (Δ) | promoted | "
            "seconds: users / round / compare / promote / eval |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s, m = r["signals"], r["round_metrics"]
        proxy = r["proxy_accuracy"]
        proxy_text = ("no RM" if not proxy else f"{proxy['accuracy']:.0%} of {proxy['pairs']}"
                      if proxy["accuracy"] is not None else "0 gold-distinct pairs")
        ppl = (f"{_num(m.get('ptx_ppl_after'))} ({_num(m.get('ptx_ppl_increase'), '{:+.1%}')})"
               if m.get("ptx_ppl_after") is not None else "—")
        secs = " / ".join(f"{r['seconds'].get(k, 0):.0f}" for k in ("users", "round", "compare", "promote", "evaluate"))
        status = r["status"] + (" (reused adapter)" if r.get("reused_adapter") else "")
        lines.append(
            f"| {r['round']} (#{r['round_id']}) | {status} | {s['chat_turns']} | {s['thumbs_up']}/{s['thumbs_down']} "
            f"| {s['compare_votes']} ({s['candidate_votes']}) | {s['rankings']} | {s['demonstrations']} | {s['votes']} "
            f"| {proxy_text} | {_rate(r['gold_win_rate'].get('candidate'))} | {_pairs(r.get('compare_gold'))} "
            f"| {_rate(r['gold_win_rate']['live'])} "
            f"| {_num(m.get('kl_to_sft'))} ({_num(m.get('max_kl'))}) | {ppl} | {r['promoted'] or 'no'} | {secs} |")
    return lines


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n".join(table_lines(rows)), flush=True)


def plot_win_rates(rows: list[dict[str, Any]], path: Path, sampling: str = "app sampling") -> None:
    """Gold win rate against the baseline (95% intervals) over the feedback votes collected so far, on
    held-out prompts (replies drawn as ``sampling`` says), and in the users' own Compare pairs (against
    live, as sampled for them); round 0 (against the bare base) as its own marker at 0 votes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def errorbar(points: list[tuple[int, dict[str, Any]]], style: str, label: str) -> None:
        if points:
            x = [p[0] for p in points]
            y = [p[1]["rate"] for p in points]
            err = [[p[1]["rate"] - p[1]["ci_low"] for p in points], [p[1]["ci_high"] - p[1]["rate"] for p in points]]
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=4, label=label)

    fig, ax = plt.subplots(figsize=(7, 4))
    users_rows = [r for r in rows if r["round"] > 0]
    baseline = users_rows[0]["gold_win_rate"]["against"] if users_rows else "baseline"
    for key, style in (("candidate", "o-"), ("live", "s--")):
        errorbar([(r["cumulative_votes"], r["gold_win_rate"][key]) for r in users_rows
                  if r["gold_win_rate"].get(key) and r["gold_win_rate"][key]["rate"] is not None],
                 style, f"{key} vs {baseline} (held-out prompts, {sampling})")
    errorbar([(r["cumulative_votes"], r["compare_gold"]) for r in users_rows
              if r.get("compare_gold") and r["compare_gold"]["rate"] is not None],
             "^:", "candidate vs live in the users' Compare pairs (their sampling)")
    zero = [r for r in rows if r["round"] == 0 and r["gold_win_rate"]["live"]["rate"] is not None]
    errorbar([(0, r["gold_win_rate"]["live"]) for r in zero], "D", "round 0 vs bare base (starter set)")
    ax.axhline(0.5, color="grey", linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("feedback votes so far (thumbs + Compare + rankings + demonstrations)")
    ax.set_ylabel("gold win rate")
    ax.set_title("Simulated users, real app: gold win rate per round (95% intervals)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md (config, table, notes) and gold_win_rate.png in `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    rows = results["rounds"]
    cfg = results["config"]
    md = [f"# bench_loop: {cfg['gold']}{' (null users)' if cfg['null'] else ''}", "",
          f"Base model `{cfg['base_model']}`, engine `{cfg['engine']}`, {cfg['users']} users x {cfg['actions']} "
          f"actions per round, noise temperature {cfg['noise_temperature']}, baseline "
          f"`{results.get('round0_policy', '?')}` ({cfg['baseline']}), {results['prompts']['eval']} held-out prompts "
          f"({results['prompts']['users']} for users).", ""]
    md += table_lines(rows) if rows else ["No round ran."]
    sampling = results.get("eval_sampling", "greedy")
    md += ["", f"Gold win rates: replies on held-out prompts ({sampling}), wins / (wins + losses) with reply i "
           "against the baseline's reply i, 95% interval (Wilson with one reply per prompt, else a bootstrap over "
           "prompts), against the baseline; row 0 (round 0, the starter set, promoted by the operator before any user acted) "
           "against the bare base: what the starter set bought. "
           "Proxy RM accuracy: the round's reward adapter on the gold-labelled pairs among the baseline's, live's and "
           "the candidate's replies. KL and ptx perplexity: the round's own metrics (registry)."]
    for key in ("stopped", "null_check", "wall_seconds"):
        if results.get(key) is not None:
            md.append(f"\n**{key}:** {results[key]}")
    (out / "results.md").write_text("\n".join(md) + "\n")
    if rows:
        plot_win_rates(rows, out / "gold_win_rate.png", "greedy" if sampling == "greedy" else "app sampling")
    return results


# --------------------------------------------------------------------------- #
# Command line: one option per BenchLoopConfig field
# --------------------------------------------------------------------------- #


def parse_args(argv: list[str] | None = None) -> BenchLoopConfig:
    """A BenchLoopConfig from the command line (each field is `--name-with-dashes`, its help the field's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    cfg = BenchLoopConfig(**vars(parser.parse_args(argv)))
    return apply_tiny(cfg) if cfg.tiny else cfg


def add_config_options(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One `--name-with-dashes` option per BenchLoopConfig field (or just `names`), its help the field's."""
    for f in dataclasses.fields(BenchLoopConfig):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f.metadata["help"] + f" (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=helptext)
        elif isinstance(default, list):
            parser.add_argument(flag, action="append", default=[], help=helptext)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=helptext)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    results = run_bench(cfg)
    written = [p for p in ("results.md", "results.json", "gold_win_rate.png") if (Path(cfg.out) / p).is_file()]
    print(f"\nresults in {cfg.out}: {', '.join(written)} ({results.get('wall_seconds', 0):.0f} s)")
    if results.get("null_check", "").startswith("FAILED"):
        print(results["null_check"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
