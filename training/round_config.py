"""A retraining round's settings (`alignloop round --set key=value`), and those of the first version a fresh
install trains; one field per setting, its help text beside it (the CLI lists them)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.config import ConfigError, LoraSettings, PPOConfig, RewardConfig, SFTConfig, _f
from training.sampling import APP_SAMPLING, ReplySampling, evaluation_sampling


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
    heldout_fraction: float = _f(0.2, "Share of prompts held out of every training step, by prompt hash: the reward model and the candidate are judged on them only.")
    min_pairs: int = _f(8, "Fewest preference pairs to train a reward model and run PPO (else SFT only or stop).")
    min_prompts: int = _f(8, "Fewest PPO training prompts to run PPO.")
    judge: Literal["auto", "previous", "split", "none"] = _f("auto", "Reward model that decides the reward-gain gate, one PPO did not optimise: 'previous' (the live reward model before this round), 'split' (a second reward model on half the training prompts; the proxy PPO optimises trains on the other half), 'auto' (previous if any, else split), 'none' (no reward-gain gate).")
    rm_floor: float = _f(0.55, "Reward-model gate: held-out pairwise accuracy must be above this (its 95% Wilson interval); clearly below it (upper bound under it) stops the round.")
    rm_tolerance: float = _f(0.02, "Reward-model gate: accuracy minus the previous reward model's on the same held-out pairs must be above -tolerance (95% bootstrap interval); clearly below stops the round.")
    min_rm_eval_pairs: int = _f(20, "Fewest held-out preference pairs for a reward-model verdict; fewer: 'not enough evidence' (PPO still runs, the candidate's gates do not pass).")
    eval_prompts: int = _f(32, "Held-out prompts on which candidate and live reply and are scored; never training prompts.")
    eval_sampling: Literal["app", "greedy"] = _f("app", "How candidate and live reply in the evaluation: 'app' (as the chat app serves them by default: training.sampling.APP_SAMPLING, eval_samples per prompt, gains averaged per prompt) or 'greedy' (one per prompt).")
    eval_samples: int = _f(2, "Replies per held-out prompt and side with eval_sampling 'app'.")
    min_eval_prompts: int = _f(8, "Fewest held-out prompts for a reward-gain verdict; fewer: 'not enough evidence' (registered, never auto-promoted).")
    eval_max_new_tokens: int = _f(48, "Longest reply when evaluating candidate vs live.")
    bootstrap_resamples: int = _f(2000, "Resamples of the percentile bootstrap behind the reward-gain intervals.")
    report_prompts: int = _f(4, "Fixed prompts (the starter set's first N) that every round's report answers with live and candidate, so reports compare across rounds.")
    use_thumbs: bool = _f(True, "Train the reward models on each 👍/👎 as its own row (RewardConfig.thumbs_data, KTO-style); off: a 👍 and a 👎 reply to the same message become a preference pair instead.")
    sft_replay: float = _f(1.0, "When the live policy was fine-tuned before: old demonstrations replayed per new one in this round's SFT (a random sample; the new ones always all); < 0: every demonstration, every round.")
    sft_after_ppo: Literal["continue", "skip"] = _f("skip", "New demonstrations when the live policy was PPO-trained: 'skip' leaves them to PPO's ptx term and the reward model, PPO continuing from live with its old reference; 'continue' fine-tunes that policy on them (and replayed ones) and anchors PPO's KL to the result. Measured on a second round after a promoted first (training/README.md): 'continue' won 24% [18, 32] against the policy it started from, 'skip' 45% [36, 54].")
    max_kl: float = _f(10.0, "Gate: KL(policy || reference) per reply at the end of PPO, in nats.")
    min_reward_gain: float = _f(0.0, "Gate: the judge's reward of candidate minus live, paired per held-out prompt, must be above this (95% bootstrap interval).")
    max_ptx_ppl_increase: float = _f(0.1, "Gate: relative increase of the ptx perplexity (0.1 = +10%).")
    auto_promote: bool = _f(False, "Promote a candidate whose gates passed once its Compare votes vs live pass the sequential test.")
    users_settle_undecided: bool = _f(True, "Auto-promotion when a reward-model or judge gate is undecided (enough held-out units, its 95% interval straddles the threshold): the users' Compare votes (the sequential test, still at promote_alpha) decide instead of it blocking. A failed gate, too few units, and the KL and ptx gates always block.")
    min_votes: int = _f(0, "Counted decisive Compare votes before auto-promotion is possible (the test is valid at any count).")
    promote_alpha: float = _f(0.05, "Chance of promoting a candidate no better than live, however often promotion is checked.")
    promote_min_voters: int = _f(5, "Distinct voters with a counted vote before auto-promotion is possible.")
    promote_max_votes_per_voter: int = _f(20, "Counted votes per voter (their first ones): bounds one person's weight.")
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=2.0, batch_size=8, progress=False, lora=_small_lora()),
                           metadata={"help": "SFT step defaults (`--set sft.epochs=3`)."})
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=1.0, groups_per_batch=8, progress=False,
                                                                      lora=_small_lora()),
                                 metadata={"help": "Reward-model step defaults (`--set reward.lr=5e-5`)."})
    # ptx_coef 0.1, not PPOConfig's 1.0: a round's ptx corpus is the demonstrations, so at γ = 1 the step was
    # mostly more SFT. On Gemma 3 270M (scripts/bench_loop.py, gold (a), 3 users' rounds each): γ = 1 gave KL to
    # SFT 12.8 and 23.1 nats (gate 10) and gold wins vs round 0 of 54% and 63%; γ = 0.1 gave 2.6 and 5.5 nats
    # and 72% and 71% (training/README.md).
    # PPO trains the policy users are served: rollouts and every log-prob at the app's sampling (temperature,
    # frequency penalty, min-p; top-p stays off, see training/README.md) and as long as the app's replies in
    # bench_loop (64 tokens). The first round so trained (bench_loop, gold (a)) passed its judge gate, +1.56
    # [+0.66, +2.34]; by gold it won 71% [63, 78] against round 0 on held-out prompts at the app's sampling and
    # 59% [44, 72] of the 51 users' Compare pairs voted before the run stopped. At temperature 1 and 48 tokens
    # the candidates had ended their replies within the users' limit less often than live (training/README.md).
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(iterations=20, rollout_batch=8, minibatch=4, ppo_epochs=2,
                                                             max_new_tokens=64, ptx_coef=0.1, progress=False,
                                                             temperature=APP_SAMPLING.temperature,
                                                             frequency_penalty=APP_SAMPLING.frequency_penalty,
                                                             min_p=APP_SAMPLING.min_p, lora=_small_lora()),
                           metadata={"help": "PPO-ptx step defaults (`--set ppo.iterations=50`)."})

    def __post_init__(self) -> None:
        if self.sft_after_ppo not in ("continue", "skip"):
            raise ConfigError(f"sft_after_ppo={self.sft_after_ppo!r}: use 'continue' or 'skip'.")
        if self.eval_sampling not in ("app", "greedy") or self.eval_samples < 1:
            raise ConfigError(f"eval_sampling={self.eval_sampling!r}, eval_samples={self.eval_samples}: use 'app' with "
                              "eval_samples >= 1 (replies per held-out prompt) or 'greedy'.")

    def reply_sampling(self) -> ReplySampling:
        """How the evaluation draws candidate's and live's replies (``eval_sampling``, ``eval_samples``)."""
        return evaluation_sampling(self.eval_sampling, self.eval_samples)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def first_run_settings() -> list[str]:
    """`--set` overrides of the first aligned version a fresh install trains (`alignloop demo`): SFT alone
    on the starter demonstrations (a reward model and PPO come in the next rounds, with the users'
    feedback), two epochs, in bfloat16 where the CPU has native bfloat16 (faster than float32 there).
    One epoch is not enough: on the 20 evaluation prompts (scripts/reply_quality.py, greedy, frequency
    penalty 0.5) one epoch ended 3/20 replies properly at lr 2e-4 and 7/20 at lr 6e-4; two epochs at 2e-4
    end them all (README, "The first start")."""
    settings = ["min_pairs=1000000000", "sft.epochs=2", "sft.lr=2e-4"]
    if native_bf16_cpu():
        settings.append("sft.dtype=bfloat16")
    return settings


def native_bf16_cpu() -> bool:
    """Whether this machine's CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_round_config(path: str | Path) -> RoundConfig:
    """A RoundConfig from JSON (e.g. the config a round recorded); nested step configs included."""
    from training.config import config_from_dict

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
