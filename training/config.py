"""Typed configurations for SFT, the reward model and PPO-ptx.

The same dataclasses are used by the Python API (``train_sft(SFTConfig(...))``)
and by the CLI (``alignloop train sft --set lr=1e-4``), and each run writes its
configuration as JSON beside its adapter and metrics, so a run can be read back.
Every field has a default and a one-line help text in its ``metadata``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best here
    """A dataclass field with a default and a help text (shown by the CLI)."""
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to use instead."""


MIN_PROMPT_TOKENS = 8  # BOS + an empty user turn + the generation prompt need about this many


@dataclass(frozen=True)
class TokenBudget:
    """How many tokens a prompt and a reply may take: the one truncation rule's numbers.

    ``chat_data.fit_group`` applies them (SFT, the reward model, PPO and its sampler all
    go through it): a reply is kept whole up to ``reply`` tokens (its stop token included);
    the prompt gets ``max_length`` minus the kept reply, capped at ``max_prompt_tokens``
    when that is set, and loses its oldest turns first.
    """

    max_length: int
    max_prompt_tokens: int = 0
    max_reply_tokens: int = 0

    def __post_init__(self) -> None:
        if self.reply < 1 or self.max_length - self.reply < MIN_PROMPT_TOKENS:
            raise ConfigError(
                f"max_length={self.max_length} leaves {self.max_length - self.reply} prompt tokens next to a "
                f"{self.reply}-token reply budget; raise max_length or lower max_reply_tokens (PPO: max_new_tokens)."
            )
        if self.max_prompt_tokens and self.max_prompt_tokens < MIN_PROMPT_TOKENS:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens} is too small; use 0 or >= {MIN_PROMPT_TOKENS}.")

    @property
    def reply(self) -> int:
        """Longest kept reply in tokens (stop token included): ``max_reply_tokens``, else ``max_length // 2``."""
        return self.max_reply_tokens or self.max_length // 2

    def prompt(self, reply_tokens: int) -> int:
        """Longest kept prompt next to a reply of ``reply_tokens`` tokens."""
        room = self.max_length - reply_tokens
        return min(room, self.max_prompt_tokens) if self.max_prompt_tokens else room

    @property
    def generation_prompt(self) -> int:
        """Longest prompt when the reply is not known yet (sampling): room for the longest reply."""
        return self.prompt(self.reply)


@dataclass
class LoraSettings:
    """LoRA adapter shape. The targets are the ones vLLM serves for Gemma 3."""

    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = _f(LORA_TARGET_MODULES, "Linear layers that get a LoRA adapter.")

    def to_peft(self) -> Any:
        """The equivalent ``peft.LoraConfig`` for a causal LM."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
            bias="none",
        )


@dataclass
class BaseSettings:
    """Fields every trainer shares: which base model, where to write, how to run."""

    base_model: str = _f("default", "Prepared model folder, .gguf, HF id, or 'default' (embedded Gemma 3 270M).")
    output_dir: str = _f("runs/train", "A fresh folder for the adapter, config and metrics (must not be served).")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.")
    dtype: str = _f("auto", "'auto' (float32 on CPU, bfloat16 on GPU), 'float32' or 'bfloat16'.")
    load_in_4bit: bool = _f(False, "QLoRA: load the frozen base in 4 bits with bitsandbytes (GPU only).")
    attention: str = _f("auto", "Attention kernel: 'auto' (eager for Gemma 2/3 on GPU, else sdpa), 'sdpa' or 'eager'.")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA adapter shape."})
    max_length: int = _f(512, "Longest prompt + reply in tokens (see max_prompt_tokens, max_reply_tokens).")
    max_prompt_tokens: int = _f(0, "Longest prompt in tokens; oldest turns go first, BOS and the system turn stay (0: max_length minus the kept reply).")
    max_reply_tokens: int = _f(0, "Longest reply in tokens, stop token included; a longer one is cut at its end and loses its stop token (0: max_length // 2; PPO: max_new_tokens).")
    seed: int = _f(0, "Random seed for data order, initialisation and sampling.")
    logits_chunk: int = _f(128, "Rows of hidden states projected to the vocabulary at once (bounds memory).")
    gradient_checkpointing: bool = _f(False, "Recompute each layer's activations in backward instead of keeping them: less memory (PPO on Gemma 3 270M: net peak 2.4-2.6 GB, 0.43x four separate models) for 1.45x the time of a forward + backward.")
    progress: bool = _f(True, "Show progress bars.")

    def token_budget(self) -> TokenBudget:
        """The prompt and reply budgets of this run (raises ConfigError when they do not fit)."""
        return TokenBudget(self.max_length, self.max_prompt_tokens, self.max_reply_tokens)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def save(self, folder: str | Path, name: str = "train_config.json") -> Path:
        """Write the configuration as JSON into ``folder``; return the file."""
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": type(self).__name__, **self.to_dict()}, indent=2) + "\n")
        return path


@dataclass
class SFTConfig(BaseSettings):
    """Supervised fine-tuning on demonstrations (InstructGPT step 1)."""

    data: str = _f("", "JSONL of demonstrations: {'messages': [...]} or {'prompt', 'completion'} rows.")
    epochs: float = _f(2.0, "Passes over the demonstrations.")
    lr: float = _f(2e-4, "AdamW learning rate for the LoRA weights.")
    batch_size: int = _f(8, "Examples per optimiser step.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    init_adapter: str = _f("", "Continue training this LoRA adapter folder instead of a fresh one.")


@dataclass
class RewardConfig(BaseSettings):
    """Reward model: the base + LoRA + a scalar head, trained on K-wise comparisons (InstructGPT step 2)."""

    data: str = _f("", "JSONL of preferences: groups {'prompt','completions','pairs'} or TRL {'prompt','chosen','rejected'}.")
    thumbs_data: str = _f("", "JSONL of unpaired 👍/👎 in TRL's KTO format {'prompt','completion','label': bool} (`alignloop db export --kind thumbs`); trains the same head against a learned threshold.")
    pointwise_weight: float = _f(0.5, "Weight of the 👍/👎 loss (BCE against the learned threshold) beside eq. 1's pairwise loss.")
    thumbs_per_batch: int = _f(8, "Rated replies per step, mixed with groups_per_batch preference prompts.")
    reference_data: str = _f("", "Replies whose mean reward is shifted to 0 (e.g. the SFT demonstrations); default: the preferred (and liked) replies.")
    init_adapter: str = _f("", "Warm start: a previous reward adapter folder (LoRA + head).")
    eval_fraction: float = _f(0.2, "Share of prompts (and of rated replies) held out for pairwise (and 👍/👎) accuracy.")
    epochs: float = _f(1.0, "Passes over the training prompts (InstructGPT: 1, the RM overfits quickly).")
    lr: float = _f(1e-4, "AdamW learning rate for LoRA and head.")
    groups_per_batch: int = _f(8, "Prompts per step; all K replies of a prompt are in the same batch.")
    micro_batch_groups: int = _f(0, "Prompts per forward/backward within a step, gradients accumulated (0: the whole step at once). Same gradient, lower peak memory: activations scale with prompts x length.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    eval_batch_rows: int = _f(32, "Replies per forward pass during evaluation.")


@dataclass
class PPOConfig(BaseSettings):
    """PPO-ptx (InstructGPT step 3, eq. 2): policy, value, reward and reference as adapters on one base."""

    prompts: str = _f("", "JSONL of prompts ({'prompt': str | messages}), e.g. `alignloop db export prompts`.")
    sft_adapter: str = _f("", "SFT adapter: the frozen KL reference (pi_SFT in eq. 2), and the policy's start unless init_adapter is set. Empty: the base.")
    init_adapter: str = _f("", "Policy start, e.g. the live policy when it is already a PPO policy (empty: the SFT adapter). The KL stays measured to sft_adapter.")
    reward_adapter: str = _f("", "Reward adapter folder (LoRA + head, from `alignloop train rm`); the value starts from it.")
    pretrain_data: str = _f("", "ptx corpus: .txt (one document per line) or .jsonl; default: the SFT demonstrations.")
    sft_data: str = _f("", "SFT demonstrations JSONL, used as the ptx corpus when pretrain_data is empty.")
    iterations: int = _f(100, "PPO iterations (rollout + update).")
    rollout_batch: int = _f(16, "Prompts sampled per iteration.")
    minibatch: int = _f(4, "Rollouts per gradient step.")
    ppo_epochs: int = _f(4, "Passes over each rollout batch.")
    lr: float = _f(1e-5, "AdamW learning rate for policy and value adapters and the value head.")
    max_new_tokens: int = _f(64, "Longest sampled reply.")
    temperature: float = _f(1.0, "Sampling temperature; applied to the logits wherever log-probs are computed.")
    top_p: float = _f(1.0, "Nucleus sampling (1.0: off, which keeps log-probs exact).")
    frequency_penalty: float = _f(0.0, "OpenAI's frequency penalty on the reply so far, in the rollouts and wherever log-probs are computed, so PPO trains the distribution the app serves (`serve --frequency-penalty`, 0.5 by default); 0: the model's own.")
    min_p: float = _f(0.0, "Min-p cut in the rollouts and the log-probs alike (the app serves with 0.1); 0: off.")
    advantage: Literal["gae", "rloo"] = _f("gae", "Advantage estimator: 'gae' (a value head, InstructGPT), or 'rloo': each reply's KL-penalised return minus the mean of the other replies to its prompt (Ahmadian et al. 2024; no critic, needs replies_per_prompt >= 2).")
    replies_per_prompt: int = _f(1, "Replies sampled per prompt in each rollout batch (rollout_batch must be a multiple); rloo compares them.")
    gamma: float = _f(1.0, "GAE discount.")
    lam: float = _f(0.95, "GAE lambda.")
    cliprange: float = _f(0.2, "PPO ratio clip.")
    cliprange_value: float = _f(0.2, "Value clip around the old values.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    entropy_coef: float = _f(0.0, "Entropy bonus (0: logged only).")
    init_kl_coef: float = _f(0.05, "Initial beta, the per-token KL penalty.")
    adaptive_kl: bool = _f(True, "Adapt beta toward target_kl (Ziegler et al. 2019).")
    target_kl: float = _f(6.0, "Target KL(policy||reference) per reply, in nats, for the adaptive beta.")
    kl_horizon: int = _f(0, "Horizon (in rollouts) of the adaptive beta controller; beta moves by at most 20% per horizon. 0: a quarter of this run's rollouts (iterations x rollout_batch / 4, at least one batch), so beta can move up to x2.2 within one run.")
    kl_estimator: Literal["k1", "k3"] = _f("k1", "Per-token KL estimator in the reward: k1 = log ratio, k3 = Schulman's.")
    approx_kl_stop: float = _f(0.1, "Stop this batch's PPO epochs early once approx-KL(old||new) exceeds this (0: never).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm, applied separately to the policy's and the value's gradients.")
    weight_decay: float = _f(0.0, "AdamW weight decay on the policy and value LoRA weights and the value head (0: none, the usual for LoRA; torch's AdamW default would be 0.01).")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of replies cut off without a stop token (0: none; TRL's PPO examples use 1.0).")
    whiten_rewards: bool = _f(False, "Whiten the per-token rewards before GAE.")
    ptx_coef: float = _f(1.0, "InstructGPT's gamma: weight of the pretraining NLL, a mean over tokens (nats/token), added to every PPO step's loss.")
    ptx_batch: int = _f(4, "Pretraining sequences per PPO step.")
    ptx_max_length: int = _f(256, "Longest pretraining sequence in tokens.")
    ptx_eval_docs: int = _f(16, "ptx documents held out of the ptx term and scored before and after training (the perplexity gate); at most half the corpus.")
    sampler: Literal["auto", "vllm", "hf"] = _f("auto", "Rollout engine: 'vllm' (the chat app's engine, this iteration's adapter; through the sampler_factory that `alignloop train ppo` passes to train_ppo), 'hf' (generate on the training model); 'auto': the factory's choice (vLLM on a GPU), else HF (on CPU vLLM would compete with training for the cores).")
    save_every: int = _f(0, "Save the policy adapter every N iterations into a new folder (0: only at the end).")

    def kl_horizon_rollouts(self) -> int:
        """The adaptive-β horizon in rollouts: ``kl_horizon``, else a quarter of this run's rollouts (at least one batch)."""
        return self.kl_horizon or max(self.rollout_batch, self.iterations * self.rollout_batch // 4)

    def token_budget(self) -> TokenBudget:
        """PPO's reply budget is ``max_new_tokens``; prompts get ``max_length - max_new_tokens`` (or ``max_prompt_tokens``)."""
        return TokenBudget(self.max_length, self.max_prompt_tokens, self.max_new_tokens)


def coerce(value: str, annotation: Any) -> Any:
    """Parse a CLI string into a field's type (bool, int, float, str, tuple of str)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**typing.__dict__, **globals()})  # "from __future__ import annotations"
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"Expected true/false, got {value!r}.")
    if annotation in (int, float, str):
        return annotation(value)
    if origin is tuple:
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"Expected one of {typing.get_args(annotation)}, got {value!r}.")
        return value
    return value


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` strings (``lora.r=8`` for nested fields) to a config, in place; return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not key=value, e.g. --set lr=1e-4 or --set lora.r=8.")
        key, value = item.split("=", 1)
        target = config
        *parents, leaf = key.strip().split(".")
        for name in parents:
            target = getattr(target, name)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields:
            raise ConfigError(
                f"{type(target).__name__} has no field {leaf!r}. Fields: {', '.join(sorted(fields))}."
            )
        try:
            setattr(target, leaf, coerce(value.strip(), fields[leaf].type))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Bad value for {key}: {exc}") from None
    return config


def config_help(cls: type) -> str:
    """One line per field: name, default and help (for `--help` and docs)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name}={default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config from plain data (a saved ``train_config.json``); unknown keys are an error."""
    data = {k: v for k, v in data.items() if k != "kind"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}. Fields: {', '.join(sorted(names))}.")
    if isinstance(data.get("lora"), dict):
        lora = dict(data["lora"])
        if "target_modules" in lora:
            lora["target_modules"] = tuple(lora["target_modules"])
        data["lora"] = LoraSettings(**lora)
    return cls(**data)


def load_config(cls: type, path: str | Path) -> Any:
    """Read a JSON configuration file (e.g. a previous run's ``train_config.json``) as ``cls``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"No configuration file at {path}.")
    return config_from_dict(cls, json.loads(path.read_text()))
