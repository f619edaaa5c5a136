"""Unpaired 👍/👎 train the reward head: BCE against a learned threshold (losses.pointwise_reward_loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from training import losses as L
from training.adapters import load_head
from training.chat_data import DataError, rated_replies
from training.config import RewardConfig
from training.reward_model import RewardModel, train_reward_model

LIKED, DISLIKED = "Thanks for your help! You're welcome.", "No."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def thumbs_rows(n: int) -> list[dict]:
    """TRL's unpaired-preference (KTO) rows: separate rows, each rating one reply (liked or
    disliked), on prompts of two kinds; only the reply tells which label it gets."""
    rows = []
    for i in range(n):
        prompt = f"Question {i}: can you help me?" if i % 2 else f"Request {i}: please help"
        rows.append({"prompt": prompt, "completion": LIKED, "label": True})
        rows.append({"prompt": prompt, "completion": DISLIKED, "label": False})
    return rows


def test_pointwise_loss_by_hand() -> None:
    rewards = torch.tensor([2.0, -1.0, 0.5])
    liked = torch.tensor([True, False, False])
    tau = torch.tensor(0.5, requires_grad=True)
    loss = L.pointwise_reward_loss(rewards, liked, tau)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    # liked: log σ(2 − 0.5); disliked: log σ(0.5 − (−1)) and log σ(0.5 − 0.5)
    expected = -(log_sigmoid(1.5) + log_sigmoid(1.5) + log_sigmoid(0.0)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.365324, abs=1e-5)
    loss.backward()
    # dL/dτ = mean(σ(−(r − τ)) for liked, −σ(−(τ − r)) for disliked) = (σ(−1.5) − σ(−1.5) − σ(0)) / 3
    assert tau.grad.item() == pytest.approx(-0.5 / 3, abs=1e-6)  # descent raises τ above the disliked 0.5


def test_pointwise_accuracy_counts_ties_as_disliked() -> None:
    rewards, liked = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 0])
    assert L.pointwise_accuracy(rewards, liked, 0.5).item() == 1.0
    assert L.pointwise_accuracy(rewards, liked, 0.0).item() == pytest.approx(2 / 3)


def test_thumbs_rows_in_trl_kto_format() -> None:
    rows = [{"prompt": "Hi", "completion": "Hello!", "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Go away"}], "label": False}]
    rated = rated_replies(rows)
    assert [(r.prompt, r.completion, r.liked) for r in rated] == [
        ([{"role": "user", "content": "Hi"}], "Hello!", True), ([{"role": "user", "content": "Hi"}], "Go away", False)]
    with pytest.raises(DataError, match="label"):
        rated_replies([{"prompt": "Hi", "completion": "Hello!"}])
    with pytest.raises(DataError, match="true or false"):
        rated_replies([{"prompt": "Hi", "completion": "Hello!", "label": "yes"}])


def test_thumbs_alone_train_liked_replies_above_disliked_and_the_threshold_reloads(
        tiny_model_path: Path, tmp_path: Path) -> None:
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", thumbs_rows(8))
    cfg = RewardConfig(base_model=str(tiny_model_path), thumbs_data=str(thumbs), output_dir=str(tmp_path / "rm"),
                       epochs=4, thumbs_per_batch=8, lr=5e-3, progress=False)
    rm_dir = tmp_path / "rm"
    result = train_reward_model(cfg)
    assert result.thumbs_train > 0 and result.train_pairs == 0
    assert result.thumbs_eval_accuracy == 1.0  # 20 % of the 16 rated replies held out
    rm = RewardModel.load(rm_dir, base_model=str(tiny_model_path), device="cpu")
    prompts = [f"Question {i}: can you help me?" for i in (50, 51)] + [f"Request {i}: please help" for i in (50, 51)]
    liked = rm.score(prompts, [LIKED] * 4)
    disliked = rm.score(prompts, [DISLIKED] * 4)
    assert min(liked) > max(disliked), (liked, disliked)
    _, info = load_head(rm_dir)
    assert info["threshold"] == pytest.approx(result.threshold)
    assert rm.threshold == pytest.approx(result.threshold - rm.shift)  # on the shifted scale of rm.score
    assert max(disliked) < rm.threshold < min(liked)
    # A warm start reloads the threshold with the head (lr 0: nothing moves, so it comes back as saved).
    warm = RewardConfig(base_model=str(tiny_model_path), thumbs_data=str(thumbs), init_adapter=str(rm_dir),
                        output_dir=str(tmp_path / "rm-warm"), epochs=1, lr=0.0, progress=False)
    assert train_reward_model(warm).threshold == pytest.approx(result.threshold, abs=1e-6)


def test_pairs_and_thumbs_mix_in_every_step(tiny_model_path: Path, tmp_path: Path) -> None:
    from training.metrics_log import read_metrics

    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": f"Question {i}: can you help me?", "chosen": LIKED, "rejected": DISLIKED} for i in range(4)])
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", thumbs_rows(4))
    cfg = RewardConfig(base_model=str(tiny_model_path), data=str(prefs), thumbs_data=str(thumbs),
                       output_dir=str(tmp_path / "rm"), epochs=1, groups_per_batch=2, thumbs_per_batch=3,
                       eval_fraction=0.0, progress=False)
    result = train_reward_model(cfg)
    steps = [r for r in read_metrics(result.adapter_dir) if "rm/grad_norm" in r]
    assert len(steps) == 3  # max(4 prompts / 2, 8 rated replies / 3) steps
    assert all("rm/loss" in r and "rm/thumbs_loss" in r for r in steps)
    assert result.train_pairs == 3 * 2 and result.thumbs_train == 3 * 3
