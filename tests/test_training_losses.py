"""The equations of training/losses.py on small tensors computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training import losses as L
from training.config import PPOConfig


def close(a: torch.Tensor | float, b: torch.Tensor | list | float, tol: float = 1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_masked_mean_and_whiten_ignore_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert close(L.masked_mean(x, m), 2.0)
    assert close(L.masked_var(x, m), 2 / 3)
    s = math.sqrt(2 / 3)
    assert close(L.masked_whiten(x, m), [[-1 / s, 0.0, 1 / s, 0.0]], 1e-4)


def test_last_token_index_uses_the_mask_not_the_pad_id() -> None:
    # pad == EOS == 1: comparing ids with the pad id would stop at the first EOS.
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert L.last_token_index(mask).tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="no real tokens"):
        L.last_token_index(torch.tensor([[0, 0]]))


def test_mask_after_first_stop() -> None:
    ids = torch.tensor([[5, 7, 1, 9], [5, 6, 8, 9], [1, 3, 1, 1]])
    mask, ended = L.mask_after_first_stop(ids, [1, 3])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_token_nll_is_mean_per_target_token() -> None:
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    assert close(L.token_nll(lp, torch.tensor([[1, 1], [1, 0]])), 2.0)


def test_pairwise_reward_loss_eq1() -> None:
    r = torch.tensor([2.0, 0.0, 1.0])
    w, l = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1])
    expected = (softplus(-2) + 2 * softplus(-1)) / 3  # -log σ(d) = softplus(-d)
    assert close(L.pairwise_reward_loss(r, w, l), expected)
    assert close(L.pairwise_accuracy(r, w, l), 1.0)


def test_pairwise_reward_loss_weighs_each_prompt_once() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0])
    w, l = torch.tensor([0, 3, 4, 3]), torch.tensor([1, 2, 2, 4])
    groups = torch.tensor([0, 1, 1, 1])
    expected = 0.5 * softplus(-1) + 0.5 * (softplus(-3) + softplus(-1) + softplus(-2)) / 3
    assert close(L.pairwise_reward_loss(r, w, l, groups), expected)


def test_kl_estimators() -> None:
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert close(L.kl_per_token(lp, ref, "k1"), math.log(2))
    assert close(L.kl_per_token(lp, ref, "k3"), (0.5 - 1) - math.log(0.5))  # ρ = 0.25 / 0.5
    with pytest.raises(ValueError):
        L.kl_per_token(lp, ref, "k2")


def test_a_reply_cut_off_without_a_stop_token_is_penalised_by_default() -> None:
    score, ended = torch.tensor([0.5, 0.5, -1.0]), torch.tensor([True, False, False])
    assert L.penalize_unfinished(score, ended, 1.0).tolist() == [0.5, -0.5, -2.0]
    assert L.penalize_unfinished(score, ended, 0.0).tolist() == [0.5, 0.5, -1.0]
    assert PPOConfig().missing_eos_penalty == 1.0  # on unless a round turns it off (TRL's examples use 1.0)


def test_per_token_rewards_put_the_score_on_the_last_real_token() -> None:
    score = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl_part = L.per_token_rewards(score, kl, 0.1, mask)
    assert close(rewards, [[-0.01, 0.98, 0.0], [-0.05, -0.05, 1.95]])
    assert close(kl_part, [[-0.01, -0.02, 0.0], [-0.05, -0.05, -0.05]])


def test_adaptive_kl_controller() -> None:
    ctl = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert close(ctl.update(kl=12.0, n_steps=16), 0.1 * (1 + 0.2 * 16 / 10000))  # error clipped to +0.2
    ctl = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert close(ctl.update(kl=5.4, n_steps=100), 0.1 * (1 - 0.1 * 100 / 10000))
    fixed = L.AdaptiveKLController(0.1, 6.0, 10000, adaptive=False)
    assert fixed.update(100.0, 100) == 0.1


def test_gae_by_hand() -> None:
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    ones = torch.ones(1, 3)
    adv, ret = L.gae(rewards, values, ones, gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.5, 0.5]]) and close(ret, [[1.0, 1.0, 1.0]])
    adv, ret = L.gae(rewards, values, ones, gamma=1.0, lam=0.5)
    assert close(adv, [[0.125, 0.25, 0.5]]) and close(ret, [[0.625, 0.75, 1.0]])


def test_gae_ignores_tokens_after_the_reply() -> None:
    rewards, values = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1.0, 1.0, 7.0]])
    adv, ret = L.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.5)
    # t=1: δ = 2 − 1 = 1 (no bootstrap past the end); t=0: δ = 1 + 0.9·1 − 1 = 0.9, A = 0.9 + 0.45·1
    assert close(adv, [[1.35, 1.0, 0.0]]) and close(ret, [[2.35, 2.0, 0.0]])


def test_rloo_advantage_by_hand() -> None:
    # Two prompts, 3 replies each; per-token rewards summed over each reply's mask (the third token of
    # row 1 is past its end and does not count).
    rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 5.0], [0.0, 0.0, 3.0],
                            [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    adv = L.rloo_advantages(rewards, mask, group=3)
    # Returns 1, 2, 3 → A = 1 − 2.5, 2 − 2, 3 − 1.5; returns 2, 2, −1 → A = 2 − 0.5, 2 − 0.5, −1 − 2.
    want = torch.tensor([-1.5, 0.0, 1.5, 1.5, 1.5, -3.0])[:, None] * mask
    assert close(adv, want.tolist())
    # Two replies: each is measured against the other alone.
    assert close(L.rloo_advantages(torch.tensor([[4.0], [1.0]]), torch.ones(2, 1), group=2), [[3.0], [-3.0]])
    # A prompt whose replies all score the same (however high) gives no signal.
    assert close(L.rloo_advantages(torch.full((3, 2), 7.0), torch.ones(3, 2), group=3), [[0.0, 0.0]] * 3)
    with pytest.raises(ValueError, match="at least 2 replies"):
        L.rloo_advantages(torch.zeros(4, 2), torch.ones(4, 2), group=3)


def test_clipped_surrogate_loss() -> None:
    lp = torch.full((1, 2), math.log(1.5))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, clip_frac = L.clipped_surrogate_loss(lp, old, adv, torch.ones(1, 2), cliprange=0.2)
    # A=+1: max(−1.5, −1.2) = −1.2 (clipped); A=−1: max(1.5, 1.2) = 1.5 (unclipped)
    assert close(loss, (-1.2 + 1.5) / 2) and close(clip_frac, 0.5)


def test_clipped_value_loss() -> None:
    v, old, ret = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 5.0]])
    # first token: V_clip = 1.5 → max(1, 2.25); second token masked out
    assert close(L.clipped_value_loss(v, old, ret, torch.tensor([[1, 0]]), 0.5), 0.5 * 2.25)


def test_approx_kl_and_explained_variance() -> None:
    assert close(L.approx_kl(torch.tensor([[math.log(2)]]), torch.zeros(1, 1), torch.ones(1, 1)), 1 - math.log(2))
    ret, m = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert close(L.explained_variance(ret, ret, m), 1.0)
    assert close(L.explained_variance(torch.zeros(1, 3), ret, m), 0.0)


def test_ppo_ptx_loss_combines_terms() -> None:
    t = torch.tensor
    assert close(L.ppo_ptx_loss(t(1.0), t(2.0), t(3.0), t(4.0), vf_coef=0.5, entropy_coef=0.1, ptx_coef=2.0),
                 1 + 1 - 0.3 + 8)


def test_adaptive_beta_moves_toward_the_target_within_one_default_run() -> None:
    """The default horizon is on the scale of the run: β really adapts within it (Ziegler's 10,000
    rollouts against a run of a few hundred left β fixed)."""
    from training.config import PPOConfig

    for cfg in (PPOConfig(), PPOConfig(iterations=10, rollout_batch=16)):  # the default run, and a round-sized one
        high = L.AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon_rollouts())
        low = L.AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon_rollouts())
        for _ in range(cfg.iterations):
            high.update(2 * cfg.target_kl, cfg.rollout_batch)  # KL far above target: β must grow
            low.update(0.0, cfg.rollout_batch)  # far below: β must shrink
        assert high.value > 2.0 * cfg.init_kl_coef and low.value < 0.5 * cfg.init_kl_coef
    old = L.AdaptiveKLController(0.05, 6.0, horizon=10000)  # the former default, over a 160-rollout round
    for _ in range(10):
        old.update(12.0, 16)
    assert old.value < 1.04 * 0.05
    assert PPOConfig(iterations=2, rollout_batch=16).kl_horizon_rollouts() == 16  # never under one batch
