"""PPO-ptx (InstructGPT step 3), read top to bottom like CleanRL's ppo.py.

    objective(φ) = E_(x,y)~π_φ [ r_θ(x,y) − β·log(π_φ(y|x) / π_SFT(y|x)) ] + γ·E_x~pretrain [ log π_φ(x) ]

One base model is in memory; four LoRA adapters on it play the four roles:

    policy     trainable, starts as a copy of the SFT adapter
    reference  frozen SFT adapter (no SFT adapter: the bare base, adapters disabled)
    reward     frozen reward adapter + its scalar head (scores shifted so demonstrations average 0)
    value      trainable, starts as a copy of the reward adapter + head (advantage="gae" only;
               advantage="rloo" needs no critic and builds none)

Each iteration: sample replies for a batch of prompts; recompute old log-probs,
reference log-probs, values and scores with the training model; shape per-token
rewards (−β·KL_t on every token, plus the score at the last token); GAE; then
several PPO epochs of clipped-surrogate + clipped-value + γ·ptx steps, stopping
early when approx-KL gets too large; finally adapt β toward the target KL.
The equations themselves live in :mod:`training.losses`, each written once.

The ptx loss is the mean NLL per token of a pretraining batch (nats/token), so
``ptx_coef`` (InstructGPT's γ) weighs one token of pretraining text against the
PPO loss, whose advantages are whitened to unit scale. InstructGPT's γ = 27.8
multiplied a sum over tokens normalised differently; here γ ≈ 0.5–2 is the usual range.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from training import losses as L
from training.adapters import (
    ScalarHead,
    adapter_parameters,
    attach_adapter,
    fresh_dir,
    load_base,
    load_head,
    save_adapter,
    save_head,
    use_adapter,
)
from training.chat_data import (
    DataError,
    Example,
    collate,
    encode_prompt_fitted,
    encode_text,
    left_pad,
    pad_token_id,
    pretraining_texts,
    read_rows,
    stop_token_ids,
    to_messages,
)
from training.config import ConfigError, PPOConfig
from training.logprobs import hidden_states, reply_logprobs, token_logprobs
from training.memory import peak_memory_mb, release_freed_memory
from training.metrics_log import MetricsLog
from training.progress import tracked
from training.reward_model import sequence_rewards
from training.rollout import Sampler, SamplerContext, SamplerFactory, hf_sampler_factory

# A reward function replacing the reward adapter (tests, rule-based rewards):
# (reply ids [batch, reply_len], reply mask [batch, reply_len]) -> scores [batch].
RewardFn = Callable[[Tensor, Tensor], Tensor]

TRAINABLE = {"policy", "value"}

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- #
# The four roles on one base model
# --------------------------------------------------------------------------- #


@dataclass
class PolicyStack:
    """The base model with its adapters and heads, and how to run each role."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    value_head: ScalarHead | None  # None: no critic (advantage=rloo)
    reward_head: ScalarHead | None
    reward_shift: float
    has_reference: bool
    cfg: PPOConfig

    def policy_logprobs(self, ids: Tensor, mask: Tensor, reply_mask: Tensor, ctx: int, with_entropy: bool = False) -> tuple[Tensor, Tensor]:
        use_adapter(self.model, "policy", TRAINABLE)
        return reply_logprobs(self.model, ids, mask, reply_mask, ctx, self.cfg.temperature, self.cfg.logits_chunk, with_entropy,
                              frequency_penalty=self.cfg.frequency_penalty, min_p=self.cfg.min_p)

    @torch.no_grad()
    def reference_logprobs(self, ids: Tensor, mask: Tensor, reply_mask: Tensor, ctx: int) -> Tensor:
        if self.has_reference:
            use_adapter(self.model, "reference", TRAINABLE)
            return self._served_logprobs(ids, mask, reply_mask, ctx)
        with self.model.disable_adapter():  # no SFT adapter: the reference is the base itself
            return self._served_logprobs(ids, mask, reply_mask, ctx)

    def _served_logprobs(self, ids: Tensor, mask: Tensor, reply_mask: Tensor, ctx: int) -> Tensor:
        return reply_logprobs(self.model, ids, mask, reply_mask, ctx, self.cfg.temperature, self.cfg.logits_chunk,
                              frequency_penalty=self.cfg.frequency_penalty, min_p=self.cfg.min_p)[0]

    def values(self, ids: Tensor, mask: Tensor, ctx: int) -> Tensor:
        """V(state before reply token t) for every reply position: [batch, reply_len]."""
        use_adapter(self.model, "value", TRAINABLE)
        hidden = hidden_states(self.model, ids, mask)
        return self.value_head(hidden[:, ctx - 1 : -1])

    @torch.no_grad()
    def scores(self, prompt_ids: list[list[int]], reply: Tensor, reply_mask: Tensor, ended: Tensor) -> Tensor:
        """Reward model scores of the sampler's prompt ids + reply, as in RM training (``chat_data.fit_group``):
        an ended reply ends with the canonical stop token, a cut-off one is read at its last token."""
        stops = stop_token_ids(self.tokenizer)
        examples = []
        for p, r, m, done in zip(prompt_ids, reply.tolist(), reply_mask.tolist(), ended.tolist()):
            body = [t for t, keep in zip(r, m) if keep]
            if done and body and body[-1] in stops:
                body = body[:-1] + [stops[0]]  # the canonical stop, as in RM training
            examples.append(Example(p + body, len(p)))
        batch = collate(examples, pad_token_id(self.tokenizer)).to(self.device)
        use_adapter(self.model, "reward", TRAINABLE)
        return sequence_rewards(self.model, self.reward_head, batch.input_ids, batch.attention_mask) - self.reward_shift

    def policy_parameters(self) -> list[nn.Parameter]:
        """The actor's trainable weights: the policy adapter."""
        return adapter_parameters(self.model, "policy")

    def value_parameters(self) -> list[nn.Parameter]:
        """The critic's trainable weights: the value adapter and its head (none without a critic)."""
        if self.value_head is None:
            return []
        return adapter_parameters(self.model, "value") + list(self.value_head.parameters())


def build_stack(cfg: PPOConfig, with_reward_adapter: bool) -> PolicyStack:
    """Load the base once and attach policy, reference, reward and value adapters to it.

    The value adapter and head exist only for ``advantage="gae"``: RLOO's baseline is the other replies.
    """
    base, tokenizer, device = load_base(cfg)
    sft = cfg.sft_adapter or None
    model = attach_adapter(base, "policy", cfg.init_adapter or sft, cfg.lora, trainable=True)
    if sft:
        model = attach_adapter(model, "reference", sft, cfg.lora, trainable=False)
    reward_head, shift, value_head = None, 0.0, None
    hidden_size = model.get_base_model().config.hidden_size
    if with_reward_adapter:
        model = attach_adapter(model, "reward", cfg.reward_adapter, cfg.lora, trainable=False)
        reward_head, info = load_head(cfg.reward_adapter, device)
        reward_head.requires_grad_(False)
        shift = float(info.get("shift", 0.0))
    if cfg.advantage == "gae":
        model = attach_adapter(model, "value", cfg.reward_adapter if with_reward_adapter else None, cfg.lora,
                               trainable=True)
        with torch.no_grad():
            if with_reward_adapter:
                value_head = copy.deepcopy(reward_head).requires_grad_(True)
                value_head.linear.bias -= shift  # values start on the same (shifted) scale as the rewards
            else:
                value_head = ScalarHead(hidden_size).to(device)
                value_head.linear.weight.zero_()  # V = 0 at first: no spurious advantages from a random head
    model.eval()  # no dropout anywhere: old and new log-probs must come from the same function
    use_adapter(model, "policy", TRAINABLE)
    return PolicyStack(model, tokenizer, device, value_head, reward_head, shift, bool(sft), cfg)


def memory_report(stack: PolicyStack) -> dict[str, float]:
    """Parameter memory of the shared stack vs. InstructGPT's four separate models (policy, reference, reward,
    value): the baseline stays four even when this run has fewer roles (rule rewards, no critic)."""
    base_bytes = sum(p.numel() * p.element_size() for n, p in stack.model.named_parameters() if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in stack.model.named_parameters() if "lora_" in n)
    heads = sum(p.numel() * p.element_size() for h in (stack.value_head, stack.reward_head) if h is not None
                for p in h.parameters())
    shared = base_bytes + adapter_bytes + heads
    separate = 4 * base_bytes + heads
    return {"shared_mb": shared / 2**20, "four_models_mb": separate / 2**20, "ratio": shared / separate}


# --------------------------------------------------------------------------- #
# Rollout data
# --------------------------------------------------------------------------- #


@dataclass
class RolloutBatch:
    """Left-padded prompts followed by right-padded replies, and everything PPO needs about them."""

    prompt_ids: list[list[int]]
    input_ids: Tensor  # [batch, ctx + reply_len]
    attention_mask: Tensor
    reply: Tensor  # [batch, reply_len]
    reply_mask: Tensor  # 1 up to and including the first stop token
    ended: Tensor  # [batch] bool: a stop token was produced
    context_length: int
    extras: dict[str, Tensor] = field(default_factory=dict)


def check_finite(iteration: int, **tensors: Tensor) -> None:
    """Stop before an update that would write NaN or inf into the adapters (one such step ruins them)."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(
            f"PPO iteration {iteration}: non-finite {', '.join(bad)} before the update; the adapters were not "
            "changed by it. Lower ppo.lr, or check the reward model and the sampling settings (temperature, "
            "min_p, frequency_penalty) the log-probs are computed under.")


def make_rollout_batch(prompt_ids: list[list[int]], replies: list[list[int]], stop_ids: list[int], pad_id: int,
                       device: torch.device) -> RolloutBatch:
    """Pack sampled replies; tokens after the first stop token are masked everywhere (and set to pad)."""
    query, query_mask = left_pad(prompt_ids, pad_id)
    width = max(1, max(len(r) for r in replies))
    reply = torch.full((len(replies), width), pad_id, dtype=torch.long)
    for i, r in enumerate(replies):
        reply[i, : len(r)] = torch.tensor(r, dtype=torch.long) if r else reply[i, :0]
    lengths = torch.tensor([len(r) for r in replies])
    in_reply = torch.arange(width)[None, :] < lengths[:, None]
    reply_mask, ended = L.mask_after_first_stop(reply, stop_ids)
    reply_mask = reply_mask * in_reply
    empty = reply_mask.sum(1) == 0
    reply_mask[empty, 0] = 1.0  # an empty reply still has one position to score
    reply = torch.where(reply_mask.bool(), reply, torch.full_like(reply, pad_id))
    reply[empty, 0] = stop_ids[0]
    ended = ended | empty
    input_ids = torch.cat([query, reply], dim=1).to(device)
    attention = torch.cat([query_mask, reply_mask.long()], dim=1).to(device)
    return RolloutBatch(prompt_ids, input_ids, attention, reply.to(device), reply_mask.to(device), ended.to(device),
                        query.shape[1])


# --------------------------------------------------------------------------- #
# The ptx term
# --------------------------------------------------------------------------- #


def pretraining_nll(model: nn.Module, examples: list[Example], pad_id: int, device: torch.device, chunk: int = 128,
                    batch_size: int = 8) -> float:
    """Mean NLL per token of ``examples`` under the active adapter (exp() of it is the perplexity)."""
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id).to(device)
            lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.reply_mask, chunk=chunk)
            total += -(lp * batch.reply_mask).sum().item()
            tokens += batch.reply_mask.sum().item()
    return total / max(tokens, 1)


@dataclass
class PtxCorpus:
    """The ptx corpus split in two disjoint sets of documents: ``train`` feeds the ptx term,
    ``held_out`` measures the pretraining perplexity the term never trained on (the gate)."""

    train: list[Example]
    held_out: list[Example]


def split_ptx_documents(texts: list[str], eval_docs: int, seed: int) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): distinct texts shuffled with ``seed``; at most
    ``eval_docs`` and at most half of them are held out, so the ptx term keeps the larger part."""
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    random.Random(seed).shuffle(unique)
    n_eval = min(eval_docs, len(unique) // 2)
    return unique[n_eval:], unique[:n_eval]


def load_ptx_corpus(cfg: PPOConfig, tokenizer: Any) -> PtxCorpus:
    """The ptx corpus (``pretrain_data``, else the SFT demonstrations) as training and held-out
    documents; every token after the first is a target."""
    path = cfg.pretrain_data or cfg.sft_data
    if not path:
        if cfg.ptx_coef > 0:
            raise ConfigError("ptx_coef > 0 needs a corpus: set pretrain_data (or sft_data), or set ptx_coef=0.")
        return PtxCorpus([], [])
    train, held_out = split_ptx_documents(pretraining_texts(path, tokenizer), cfg.ptx_eval_docs, cfg.seed)

    def encode(texts: list[str]) -> list[Example]:
        return [e for e in (encode_text(tokenizer, t, cfg.ptx_max_length) for t in texts) if len(e.input_ids) > 1]

    corpus = PtxCorpus(encode(train), encode(held_out))
    if cfg.ptx_coef > 0 and not corpus.train:
        raise DataError(f"The ptx corpus {path} has no document to train on; add documents or set ptx_coef=0.")
    if not corpus.held_out:
        logger.warning("The ptx corpus %s has too few documents to hold any out: no ptx perplexity report.", path)
    return corpus


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclass
class PPOResult:
    """Where the policy adapter went, and the run's headline numbers."""

    adapter_dir: Path
    metrics_path: Path
    iterations: int
    reward_first: float
    reward_last: float
    kl_last: float
    ptx_nll_before: float  # on held-out ptx documents (never trained on): the perplexity gate
    ptx_nll_after: float
    ptx_train_nll_before: float  # on the documents the ptx term trains on (at most ptx_eval_docs of them)
    ptx_train_nll_after: float
    memory: dict[str, float]
    seconds: float
    samples: list[dict[str, Any]]


def make_sampler(cfg: PPOConfig, stack: PolicyStack, sampler_factory: SamplerFactory | None) -> Sampler:
    """The rollout sampler: HF generate when ``cfg.sampler`` is 'hf' or no factory is given, else the
    caller's factory (which decides for 'auto', e.g. vLLM on a GPU). 'vllm' without a factory is an error:
    ``training`` cannot start the chat app's engine itself (imports flow one way)."""
    ctx = SamplerContext(stack.model, stack.tokenizer, TRAINABLE, stop_token_ids(stack.tokenizer),
                         pad_token_id(stack.tokenizer), stack.device)
    if cfg.sampler == "vllm" and sampler_factory is None:
        raise ConfigError("sampler='vllm' needs the chat app's engine: run `alignloop train ppo --sampler vllm`, or pass "
                          "sampler_factory=chat_app.engines.rollout_sampler.vllm_sampler_factory to train_ppo; "
                          "or set sampler='hf'.")
    if cfg.sampler == "hf" or sampler_factory is None:
        return hf_sampler_factory(cfg, ctx)
    return sampler_factory(cfg, ctx)


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None,
              sampler_factory: SamplerFactory | None = None) -> PPOResult:
    """Run PPO-ptx; write the policy adapter to ``cfg.output_dir`` (with GAE, the value adapter in ``value/``).

    Args:
        cfg: the run's configuration.
        reward_fn: score replies with this instead of ``cfg.reward_adapter`` (rule-based rewards, tests).
        sampler_factory: builds the rollout sampler from ``(cfg, SamplerContext)`` unless ``cfg.sampler``
            is 'hf' (see :mod:`training.rollout`); e.g. ``chat_app.engines.rollout_sampler.vllm_sampler_factory``.
            None: HF generate on the training model.

    Example:
        >>> train_ppo(PPOConfig(prompts="prompts.jsonl", sft_adapter="runs/sft-1",
        ...                     reward_adapter="runs/rm-1", sft_data="sft.jsonl", output_dir="runs/ppo-1"))  # doctest: +SKIP
    """
    if reward_fn is None and not cfg.reward_adapter:
        raise ConfigError("PPO needs a reward: set reward_adapter (from `alignloop train rm`) or pass reward_fn.")
    if not cfg.prompts:
        raise DataError("PPO needs prompts: pass prompts=PATH (`alignloop db export prompts`).")
    if cfg.rollout_batch % cfg.minibatch:
        raise ConfigError(f"rollout_batch ({cfg.rollout_batch}) must be a multiple of minibatch ({cfg.minibatch}).")
    k = cfg.replies_per_prompt
    if k < 1 or cfg.rollout_batch % k:
        raise ConfigError(f"rollout_batch ({cfg.rollout_batch}) must be a multiple of replies_per_prompt ({k}).")
    if cfg.advantage == "rloo" and k < 2:
        raise ConfigError("advantage=rloo compares replies to the same prompt: set replies_per_prompt to 2 or more "
                          "(e.g. 4, with rollout_batch a multiple of it).")
    cfg.token_budget()  # a budget that cannot fit fails before anything is written
    out = fresh_dir(cfg.output_dir)
    cfg.save(out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    stack = build_stack(cfg, with_reward_adapter=reward_fn is None)
    critic = stack.value_head is not None  # build_stack decides: GAE has a critic, RLOO none
    tok, device = stack.tokenizer, stack.device
    stop_ids, pad = stop_token_ids(tok), pad_token_id(tok)
    prompts = [to_messages(row["prompt"]) for row in read_rows(cfg.prompts)]
    # The one truncation rule: these ids go to the sampler and to every scorer, unchanged.
    prompt_budget = cfg.token_budget().generation_prompt
    encoded = [encode_prompt_fitted(tok, p, prompt_budget) for p in prompts]
    ptx = load_ptx_corpus(cfg, tok)
    ptx_seen = ptx.train[: cfg.ptx_eval_docs]
    policy_params, value_params = stack.policy_parameters(), stack.value_parameters()
    optimizer = torch.optim.AdamW(policy_params + value_params, lr=cfg.lr, eps=1e-5, weight_decay=cfg.weight_decay)
    kl_ctl = L.AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon_rollouts(), cfg.adaptive_kl)
    sampler = make_sampler(cfg, stack, sampler_factory)
    try:  # a vLLM sampler owns an engine process: close it however the run ends
        memory = memory_report(stack)
        log = MetricsLog(out, cfg.to_dict())
        (out / "memory.json").write_text(json.dumps(memory, indent=2) + "\n")

        ptx_before = ptx_nll(stack, ptx.held_out, cfg)
        ptx_train_before = ptx_nll(stack, ptx_seen, cfg)
        order: list[int] = []
        reward_history: list[float] = []
        kl_last = 0.0
        samples: list[dict[str, Any]] = []
        started = time.perf_counter()
        bar = tracked(range(1, cfg.iterations + 1), "PPO", show_bar=cfg.progress)
        for iteration in bar:
            # ---- 1. Rollout: sample replies with the current policy --------------------------------------
            t0 = time.perf_counter()
            n_prompts = cfg.rollout_batch // k
            while len(order) < n_prompts:
                order += [int(i) for i in rng.permutation(len(prompts))]
            picked, order = order[:n_prompts], order[n_prompts:]
            idx = [i for i in picked for _ in range(k)]  # each prompt's k replies side by side (rloo's groups)
            if sampler.needs_adapter_folder:  # vLLM: this iteration's policy, under a new name and folder
                folder = save_adapter(stack.model, "policy", out / "rollout_adapters" / f"iter-{iteration:05d}")
                sampler.set_policy(f"{out.name}-iter-{iteration:05d}", folder)
            replies = sampler.sample([encoded[i] for i in idx], [prompts[i] for i in idx])
            rb = make_rollout_batch([encoded[i] for i in idx], replies, stop_ids, pad, device)
            ids, mask, rmask, ctx = rb.input_ids, rb.attention_mask, rb.reply_mask, rb.context_length
            t_gen = time.perf_counter() - t0

            # ---- 2. Score: old log-probs (recomputed, not from the sampler), reference, values, reward ---
            t0 = time.perf_counter()
            with torch.no_grad():
                old_logprobs, _ = stack.policy_logprobs(ids, mask, rmask, ctx)
                ref_logprobs = stack.reference_logprobs(ids, mask, rmask, ctx)
                old_values = stack.values(ids, mask, ctx) * rmask if critic else torch.zeros_like(old_logprobs)
                score = reward_fn(rb.reply, rmask).to(device).float() if reward_fn else stack.scores(rb.prompt_ids, rb.reply, rmask, rb.ended)
            raw_score = score.clone()
            score = L.penalize_unfinished(score, rb.ended, cfg.missing_eos_penalty)
            kl = L.kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * rmask
            rewards, kl_rewards = L.per_token_rewards(score, kl, kl_ctl.value, rmask)
            if cfg.whiten_rewards:
                rewards = L.masked_whiten(rewards, rmask, shift_mean=False)
            if critic:
                advantages, returns = L.gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)  # returns before whitening
                advantages = L.masked_whiten(advantages, rmask)
            else:  # scaled only: the leave-one-out baseline stays the baseline
                advantages, returns = L.rloo_advantages(rewards, rmask, k), old_values
                advantages = L.masked_whiten(advantages, rmask, shift_mean=False)
            check_finite(iteration, score=raw_score, kl=kl, advantages=advantages)
            t_score = time.perf_counter() - t0

            # ---- 3. Update: PPO epochs over minibatches, each step with the ptx term ---------------------
            t0 = time.perf_counter()
            stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "ptx", "entropy", "clipfrac", "approx_kl",
                                                             "policy_grad_norm", "value_grad_norm",
                                                             "ptx_grad_norm", "pg_grad_norm")}
            for epoch in range(cfg.ppo_epochs):
                epoch_kl = []
                for mb in torch.from_numpy(rng.permutation(cfg.rollout_batch)).split(cfg.minibatch):
                    mb = mb.to(device)
                    m = rmask[mb]
                    optimizer.zero_grad(set_to_none=True)
                    # Eq. 2's loss is a sum, so its gradient is the sum of its terms' gradients: each term is
                    # backpropagated as soon as it is computed, and the activations of the ptx, value and
                    # policy passes are never held at the same time (peak memory), for the same step.
                    zero = torch.zeros((), device=device)
                    ptx_loss = ptx_step_loss(stack, ptx.train, rng, cfg) if cfg.ptx_coef > 0 else zero
                    if cfg.ptx_coef > 0:
                        L.ppo_ptx_loss(zero, zero, zero, ptx_loss, cfg.vf_coef, cfg.entropy_coef, cfg.ptx_coef).backward()
                    ptx_grads = [None if q.grad is None else q.grad.clone() for q in policy_params]
                    release_freed_memory()
                    vf_loss = zero
                    if critic:
                        values = stack.values(ids[mb], mask[mb], ctx)
                        vf_loss = L.clipped_value_loss(values, old_values[mb], returns[mb], m, cfg.cliprange_value)
                        L.ppo_ptx_loss(zero, vf_loss, zero, zero, cfg.vf_coef, cfg.entropy_coef, cfg.ptx_coef).backward()
                        release_freed_memory()
                    logprobs, entropy = stack.policy_logprobs(ids[mb], mask[mb], m, ctx, with_entropy=True)
                    pg_loss, clipfrac = L.clipped_surrogate_loss(logprobs, old_logprobs[mb], advantages[mb], m, cfg.cliprange)
                    mean_entropy = L.masked_mean(entropy, m)
                    bonus = mean_entropy if cfg.entropy_coef else mean_entropy.detach()  # 0: logged, not differentiated
                    L.ppo_ptx_loss(pg_loss, zero, bonus, zero, cfg.vf_coef, cfg.entropy_coef, cfg.ptx_coef).backward()
                    ptx_norm, pg_norm = split_grad_norms(policy_params, ptx_grads)
                    policy_norm, value_norm = clip_actor_critic(policy_params, value_params, cfg.max_grad_norm)
                    optimizer.step()
                    release_freed_memory()
                    with torch.no_grad():
                        kl_now = L.approx_kl(logprobs, old_logprobs[mb], m).item()
                    epoch_kl.append(kl_now)
                    for key, value in (("pg", pg_loss), ("vf", vf_loss), ("ptx", ptx_loss), ("entropy", mean_entropy),
                                       ("clipfrac", clipfrac), ("approx_kl", kl_now), ("policy_grad_norm", policy_norm),
                                       ("value_grad_norm", value_norm), ("ptx_grad_norm", ptx_norm),
                                       ("pg_grad_norm", pg_norm)):
                        stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
                if cfg.approx_kl_stop and float(np.mean(epoch_kl)) > cfg.approx_kl_stop:
                    break  # the policy moved too far from the one that sampled: stop reusing this batch
            t_update = time.perf_counter() - t0

            # ---- 4. Adapt β toward the target KL; log --------------------------------------------------
            kl_per_reply = kl.sum(1).mean().item()
            beta = kl_ctl.value
            kl_ctl.update(kl_per_reply, cfg.rollout_batch)
            reply_tokens = rmask.sum().item()
            reward_history.append(raw_score.mean().item())
            kl_last = kl_per_reply
            metrics = {
                "reward/mean": raw_score.mean().item(),
                "reward/std": raw_score.std().item() if len(raw_score) > 1 else 0.0,
                "reward/total_mean": (rewards * rmask).sum(1).mean().item(),
                "kl/per_reply": kl_per_reply,
                "kl/beta": beta,
                "kl/non_score_reward": kl_rewards.sum(1).mean().item(),
                "loss/policy": float(np.mean(stats["pg"])),
                "loss/value": float(np.mean(stats["vf"])),
                "loss/ptx": float(np.mean(stats["ptx"])),
                "policy/entropy": float(np.mean(stats["entropy"])),
                "policy/clipfrac": float(np.mean(stats["clipfrac"])),
                "policy/approx_kl": float(np.mean(stats["approx_kl"])),
                "policy/epochs": float(epoch + 1),
                "policy/grad_norm": float(np.mean(stats["policy_grad_norm"])),
                "policy/ptx_grad_norm": float(np.mean(stats["ptx_grad_norm"])),
                "policy/pg_grad_norm": float(np.mean(stats["pg_grad_norm"])),
                "value/grad_norm": float(np.mean(stats["value_grad_norm"])),
                "reply/length": rmask.sum(1).float().mean().item(),
                "reply/ended": rb.ended.float().mean().item(),
                "time/generation_s": t_gen,
                "time/scoring_s": t_score,
                "time/update_s": t_update,
                "time/tokens_per_s": reply_tokens / max(t_gen, 1e-9),
                "memory/peak_mb": peak_memory_mb(device),
            }
            if critic:
                metrics["value/explained_variance"] = L.explained_variance(old_values, returns, rmask).item()
            log.log(iteration, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{kl_per_reply:.3f}", beta=f"{beta:.3f}")
            if cfg.save_every and iteration % cfg.save_every == 0:
                save_adapter(stack.model, "policy", out / "checkpoints" / f"iter-{iteration:05d}")
            if iteration == cfg.iterations:
                samples = [{"prompt": prompts[i], "reply": tok.decode(rb.reply[j][rmask[j].bool()], skip_special_tokens=True),
                            "score": raw_score[j].item()} for j, i in enumerate(idx[:4])]

        ptx_after = ptx_nll(stack, ptx.held_out, cfg)
        ptx_train_after = ptx_nll(stack, ptx_seen, cfg)
        log.log(cfg.iterations, {"ptx/nll_before": ptx_before, "ptx/nll_after": ptx_after,
                                 "ptx/train_nll_before": ptx_train_before, "ptx/train_nll_after": ptx_train_after,
                                 "ptx/held_out_docs": float(len(ptx.held_out)), "ptx/train_docs": float(len(ptx.train))})
        log.close()
        save_adapter(stack.model, "policy", out)
        if critic:
            save_adapter(stack.model, "value", out / "value")
            save_head(stack.value_head, out / "value", {"shift": 0.0, "std": 1.0})
    finally:
        sampler.close()
    return PPOResult(out, log.path, cfg.iterations, reward_history[0], reward_history[-1], kl_last, ptx_before,
                     ptx_after, ptx_train_before, ptx_train_after, memory, time.perf_counter() - started, samples)


def clip_actor_critic(policy_params: list[nn.Parameter], value_params: list[nn.Parameter],
                      max_norm: float) -> tuple[Tensor, Tensor]:
    """Clip the actor's and the critic's gradients each to ``max_norm``; return their norms before clipping.

    They are separate networks sharing an optimiser step: clipped together, a large value-loss
    gradient (early, while V is far off) would shrink the policy's step, and the reverse.
    """
    return (torch.nn.utils.clip_grad_norm_(policy_params, max_norm),
            torch.nn.utils.clip_grad_norm_(value_params, max_norm))


def split_grad_norms(policy_params: list[nn.Parameter], ptx_grads: list[Tensor | None]) -> tuple[float, float]:
    """(norm of the ptx term's gradient, norm of the policy terms' gradient), both before clipping and
    weighted as in eq. 2: ``ptx_grads`` is the policy's gradient after the ptx term alone; the rest of
    ``.grad`` now is the clipped surrogate's and the entropy bonus's. Which of the two steers the policy."""
    ptx_sq = pg_sq = 0.0
    for q, g_ptx in zip(policy_params, ptx_grads):
        if q.grad is None:
            continue
        g_pg = q.grad if g_ptx is None else q.grad - g_ptx
        pg_sq += float(g_pg.float().pow(2).sum())
        if g_ptx is not None:
            ptx_sq += float(g_ptx.float().pow(2).sum())
    return ptx_sq ** 0.5, pg_sq ** 0.5


def ptx_nll(stack: PolicyStack, examples: list[Example], cfg: PPOConfig) -> float:
    """Mean NLL per token of ``examples`` under the policy (NaN when there are none)."""
    if not examples:
        return float("nan")
    use_adapter(stack.model, "policy", TRAINABLE)
    return pretraining_nll(stack.model, examples, pad_token_id(stack.tokenizer), stack.device, cfg.logits_chunk)


def ptx_step_loss(stack: PolicyStack, examples: list[Example], rng: np.random.Generator, cfg: PPOConfig) -> Tensor:
    """The pretraining NLL (mean per token) of a random ptx batch under the policy, with gradients."""
    picks = rng.choice(len(examples), size=min(cfg.ptx_batch, len(examples)), replace=False)
    batch = collate([examples[i] for i in picks], pad_token_id(stack.tokenizer)).to(stack.device)
    use_adapter(stack.model, "policy", TRAINABLE)
    lp, _ = token_logprobs(stack.model, batch.input_ids, batch.attention_mask, batch.reply_mask, chunk=cfg.logits_chunk)
    return L.token_nll(lp, batch.reply_mask)
