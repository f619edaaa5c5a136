"""Every equation of SFT, the reward model and PPO-ptx, each written once.

All functions are pure: tensors in, tensors out, no model. Masks are float or
bool tensors of the same shape as the values, 1 on the tokens that count (reply
tokens up to and including the first stop token) and 0 elsewhere.

References:
    [InstructGPT] Ouyang et al. 2022, "Training language models to follow
        instructions with human feedback", eq. 1 (reward model) and eq. 2 (PPO-ptx).
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human
        Preferences", section 2.2 (per-token KL penalty, adaptive beta).
    [GAE] Schulman et al. 2016, "High-Dimensional Continuous Control Using
        Generalized Advantage Estimation", eq. 16.
    [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 and 9.
    [k3] Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
        from Human Feedback in LLMs", eq. 6 (the leave-one-out baseline over k replies to one prompt).
    [KTO] Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
        section 4 (unpaired desirable / undesirable labels against a reference point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------- #
# Masked statistics
# --------------------------------------------------------------------------- #


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance of ``values`` where ``mask`` is 1."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Advantage whitening over the masked tokens only: (x - mean) / std, zero outside the mask.

    Padding must not enter the statistics, else short replies in a long batch
    drag the mean toward 0. ``shift_mean=False`` only rescales (for rewards).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect value function, <= 0 is useless."""
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


# --------------------------------------------------------------------------- #
# Token positions
# --------------------------------------------------------------------------- #


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, from the attention mask (not the pad id).

    Works for right and left padding, and when pad == EOS. Rows with no real
    token are an error, not a silent index 0.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}.")
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("A row of the batch has no real tokens (attention mask all 0); drop empty sequences.")
    seq_len = mask.shape[1]
    return seq_len - 1 - mask.flip(1).int().argmax(dim=1)


def mask_after_first_stop(token_ids: Tensor, stop_ids: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mask of reply tokens up to and including the first stop token; later tokens are 0.

    Args:
        token_ids: [batch, reply_len] sampled reply tokens (may be padded).
        stop_ids: ids that end a reply (EOS, <end_of_turn>).

    Returns:
        (mask [batch, reply_len] float, ended [batch] bool: whether a stop token was produced).
    """
    is_stop = torch.zeros_like(token_ids, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= token_ids == stop
    # Number of stop tokens strictly before position t; a token counts if none came before it.
    stops_before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()
    mask = (stops_before == 0).float()
    return mask, is_stop.any(dim=1)


# --------------------------------------------------------------------------- #
# SFT and ptx
# --------------------------------------------------------------------------- #


def token_nll(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Language-model loss: mean negative log-likelihood per target token over the whole batch.

    Used for SFT (targets: reply tokens) and for the ptx term (targets: every
    token of a pretraining text after the first). Normalised by the number of
    target tokens, so its scale is nats per token whatever the batch shape.
    """
    return -masked_mean(token_logprobs, mask)


# --------------------------------------------------------------------------- #
# Reward model
# --------------------------------------------------------------------------- #


def pairwise_reward_loss(rewards: Tensor, winners: Tensor, losers: Tensor, pair_group: Tensor | None = None) -> Tensor:
    """InstructGPT eq. 1: loss(θ) = −1/C(K,2) · E[ log σ(r(x, y_w) − r(x, y_l)) ].

    Args:
        rewards: [N] one scalar per reply in the batch (each reply went through the model once).
        winners, losers: [P] indices into ``rewards`` of the preferred / dispreferred reply of each pair.
        pair_group: [P] which prompt each pair belongs to. Each prompt's pairs are averaged
            (the 1/C(K,2)), then prompts are averaged, so a prompt with many replies counts
            as one example, as in InstructGPT. None: plain mean over pairs.
    """
    log_likelihood = F.logsigmoid(rewards[winners] - rewards[losers])
    if pair_group is None:
        return -log_likelihood.mean()
    groups, inverse, pairs_per_group = torch.unique(pair_group, return_inverse=True, return_counts=True)
    weights = 1.0 / (pairs_per_group[inverse].to(rewards.dtype) * len(groups))
    return -(weights * log_likelihood).sum()


def pairwise_accuracy(rewards: Tensor, winners: Tensor, losers: Tensor) -> Tensor:
    """Share of pairs where the preferred reply gets the higher reward (ties count as wrong)."""
    return (rewards[winners] > rewards[losers]).float().mean()


def pointwise_reward_loss(rewards: Tensor, liked: Tensor, threshold: Tensor) -> Tensor:
    """Unpaired 👍/👎 on the reward head: binary cross-entropy against a learned threshold τ,

        loss(θ, τ) = −E_(x,y,ℓ) [ ℓ · log σ(r_θ(x,y) − τ) + (1 − ℓ) · log σ(τ − r_θ(x,y)) ]

    with ℓ = 1 for a liked reply and 0 for a disliked one. Each rated reply is compared, as in
    eq. 1, with a virtual reply whose reward is τ: liked replies are pushed above it, disliked
    ones below, on the same scale as the pairwise loss. τ plays the role of KTO's reference
    point z_0 for unpaired desirable / undesirable examples [KTO], but is learned with θ
    (KTO's value σ(r − z_0) enters linearly; here its log, as in eq. 1 and logistic regression).

    Args:
        rewards: [N] one raw reward per rated reply.
        liked: [N] bool or 0/1 labels.
        threshold: scalar tensor τ (a trainable parameter).
    """
    sign = liked.to(rewards.dtype) * 2 - 1  # +1 liked, −1 disliked: log σ(±(r − τ))
    return -F.logsigmoid(sign * (rewards - threshold)).mean()


def pointwise_accuracy(rewards: Tensor, liked: Tensor, threshold: Tensor | float) -> Tensor:
    """Share of rated replies on the right side of the threshold (liked above τ, disliked at or below)."""
    return ((rewards > threshold) == liked.bool()).float().mean()


# --------------------------------------------------------------------------- #
# KL penalty and per-token rewards
# --------------------------------------------------------------------------- #


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π_φ || π_SFT) from the sampled tokens' log-probs.

    k1 = log π_φ(y_t) − log π_SFT(y_t): unbiased, can be negative per token (InstructGPT, Ziegler).
    k3 = (ρ − 1) − log ρ with ρ = π_SFT / π_φ: unbiased, always >= 0, lower variance [k3].
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator {estimator!r}; use 'k1' or 'k3'.")


def penalize_unfinished(score: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """r_θ(x, y) − penalty · [y was cut off without a stop token] (TRL's ``missing_eos_penalty``).

    A reply cut at the token limit is scored at its last token as if it had ended; without this
    term PPO can be paid for text the user never sees finished.
    """
    return score - penalty * (~ended.bool()).to(score.dtype)


def per_token_rewards(score: Tensor, kl: Tensor, beta: float, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The first term of InstructGPT eq. 2, spread over tokens as in [Ziegler]:

        R_t = −β · KL_t                      on every reply token
        R_T = r_θ(x, y) − β · KL_T           on the last reply token T (first stop token, or the cut-off end)

    Returns (rewards [batch, reply_len], the KL part alone), both zero on masked tokens.
    """
    mask = mask.to(kl.dtype)
    kl_reward = -beta * kl * mask
    rewards = kl_reward.clone()
    last = last_token_index(mask)
    rewards[torch.arange(len(score), device=score.device), last] += score.to(rewards.dtype)
    return rewards, kl_reward


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2.2: β ← β · (1 + K_β · e_t), e_t = clip(KL_t / KL_target − 1, −0.2, 0.2).

    ``K_β = n_steps / horizon`` (rollouts in this update over the horizon), so β moves by
    at most 20 % per horizon when the KL is far from its target: over R rollouts, by at most
    a factor exp(±0.2 · R / horizon). The horizon must therefore be on the scale of a run
    (``PPOConfig.kl_horizon_rollouts``): Ziegler's 10,000 rollouts against a round's ~160
    would leave β fixed.
    """

    def __init__(self, init_beta: float, target: float, horizon: int, adaptive: bool = True):
        self.value = init_beta
        self.target = target
        self.horizon = horizon
        self.adaptive = adaptive

    def update(self, kl: float, n_steps: int) -> float:
        """Update β from the mean KL per reply of the last batch; return the new β."""
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# --------------------------------------------------------------------------- #
# Advantages
# --------------------------------------------------------------------------- #


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation [GAE eq. 16], backward over each reply:

        δ_t = R_t + γ · V_{t+1} − V_t        (V after the last reply token is 0: the episode ends)
        A_t = δ_t + γ · λ · A_{t+1}
        returns_t = A_t + V_t                (the value targets, computed before any whitening)

    Tokens outside ``mask`` (which must be a prefix of each row) get 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae  # 0 past the reply's end, since rewards and values are masked
        advantages[:, t] = last_gae
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


def rloo_advantages(rewards: Tensor, mask: Tensor, group: int) -> Tensor:
    """The leave-one-out advantage [RLOO eq. 6], the same on every token of a reply:

        R_i = Σ_t R_t                              (the reply's score minus its β-weighted KL, eq. 2's first term)
        A_i = R_i − 1/(k−1) · Σ_{j≠i} R_j          over the k = ``group`` replies to the same prompt

    Rows are grouped k at a time in order (rows g·k … g·k+k−1 answer one prompt). The baseline is the other
    replies' mean: no critic, and the prompt's own difficulty (a reward model scores some prompts' replies
    all high) cancels out.
    """
    if group < 2 or rewards.shape[0] % group:
        raise ValueError(f"RLOO needs at least 2 replies per prompt and whole groups; got {rewards.shape[0]} rows "
                         f"in groups of {group}.")
    mask = mask.to(rewards.dtype)
    returns = (rewards * mask).sum(1).view(-1, group)
    baseline = (returns.sum(1, keepdim=True) - returns) / (group - 1)
    return (returns - baseline).view(-1, 1) * mask


# --------------------------------------------------------------------------- #
# PPO losses
# --------------------------------------------------------------------------- #


def clipped_surrogate_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate [PPO eq. 7], as a loss to minimise:

        ρ_t = π_φ(y_t) / π_old(y_t)
        L = E_t[ max(−A_t · ρ_t, −A_t · clip(ρ_t, 1 − ε, 1 + ε)) ]

    Returns (loss, clip fraction: share of tokens where the clipped term was taken).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> Tensor:
    """Clipped value loss (as in OpenAI baselines / CleanRL):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L_V = ½ · E_t[ max((V − G_t)², (V_clip − G_t)²) ]
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Approximate KL(π_old || π_φ) over the batch with the k3 estimator [k3]: E[(ρ − 1) − log ρ]."""
    log_ratio = logprobs - old_logprobs
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def ppo_ptx_loss(policy_loss: Tensor, value_loss: Tensor, entropy: Tensor, ptx_nll: Tensor,
                 vf_coef: float, entropy_coef: float, ptx_coef: float) -> Tensor:
    """InstructGPT eq. 2 as one loss to minimise:

        objective(φ) = E[r_θ(x,y) − β·log(π_φ(y|x)/π_SFT(y|x))] + γ·E_pretrain[log π_φ(x)]

    The first expectation is maximised by PPO on the KL-shaped per-token rewards
    (``policy_loss``); the second is ``γ`` times minus the pretraining NLL (mean per
    token, see :func:`token_nll`). The value function, trained alongside, adds
    ``vf_coef · value_loss`` (its parameters are separate, the sum only shares a step).
    """
    return policy_loss + vf_coef * value_loss - entropy_coef * entropy + ptx_coef * ptx_nll
