"""Reward model (InstructGPT step 2): the base + LoRA + a scalar head, on K-wise comparisons
and on unpaired 👍/👎.

* Each of a prompt's K replies goes through the model once; the C(K,2) pairs are
  formed from the K scalars (InstructGPT section 3.5), and all of a prompt's
  replies are in the same batch. The prompt runs once too: it and its replies are packed
  into one row as a tree (a block mask), with no padding between groups.
* The reward is read at the last real token (found from the attention mask) of
  prompt + reply + stop token. Truncation is ``chat_data.fit_group``'s one rule: a
  reply cut to its budget has no stop token and is read at its last kept token;
  how many prompts and replies were cut is logged (``data/*``) and returned.
* Unpaired 👍/👎 rows (TRL's KTO format) train the same head with a binary cross-entropy
  against a learned threshold (``losses.pointwise_reward_loss``), mixed into every step
  beside the pairs; the threshold is saved in ``scalar_head.json`` and reloaded on warm start.
* After training, rewards are shifted so that reference replies (the
  demonstrations, or the preferred replies) score 0 on average; the shift and
  the std are stored with the adapter and applied by :class:`RewardModel`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training.adapters import (
    ScalarHead,
    adapter_parameters,
    attach_adapter,
    fresh_dir,
    load_base,
    load_head,
    save_adapter,
    save_head,
)
from training.chat_data import (
    Batch,
    DataError,
    Example,
    PreferenceGroup,
    RatedReply,
    TruncationReport,
    collate,
    encode_prompt,
    example_for,
    fit_group,
    pad_token_id,
    preference_groups,
    rated_replies,
    read_rows,
    sft_pair,
    split_rows,
)
from training.config import RewardConfig, TokenBudget
from training.logprobs import causal_lm_parts, hidden_states
from training.losses import (
    last_token_index,
    pairwise_accuracy,
    pairwise_reward_loss,
    pointwise_accuracy,
    pointwise_reward_loss,
)
from training.memory import release_freed_memory
from training.metrics_log import MetricsLog
from training.progress import tracked


def sequence_rewards(model: nn.Module, head: ScalarHead, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Raw reward [batch]: the head on the hidden state of each row's last real token."""
    hidden = hidden_states(model, input_ids, attention_mask)
    last = last_token_index(attention_mask)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def packed_rewards(model: nn.Module, head: ScalarHead, prompts: Sequence[list[int]],
                   replies: Sequence[Sequence[list[int]]], pad_id: int, device: torch.device,
                   row_tokens: int = 1024) -> Tensor:
    """Raw rewards of K replies per prompt, each prompt and each reply run once and no padding between them.

    A prompt and its K replies are packed into one row as a tree, ``[P, R1, ..., RK]``: every reply sits
    at the positions that follow its prompt and sees its prompt and itself only (a block mask). Groups
    are packed in order into rows of at most ``row_tokens`` tokens (a longer group gets a row of its own),
    so the body runs on about the real tokens, not on every row padded to the longest. Same numbers as
    :func:`sequence_rewards` on each prompt + reply.
    """
    body, _, _ = causal_lm_parts(model)
    rows: list[list[int]] = []
    lengths: list[int] = []
    for g, (prompt, group) in enumerate(zip(prompts, replies)):
        n = len(prompt) + sum(len(r) for r in group)
        if rows and lengths[-1] + n <= row_tokens:
            rows[-1].append(g)
            lengths[-1] += n
        else:
            rows.append([g])
            lengths.append(n)
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    group_of = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    reply_of = torch.zeros((len(rows), width), dtype=torch.long)  # 0: a prompt token; k + 1: reply k's
    ends: list[tuple[int, int]] = []  # (row, index of each reply's last token), replies in input order
    for r, members in enumerate(rows):
        at = 0
        for g in members:
            p = len(prompts[g])
            ids[r, at : at + p] = torch.tensor(prompts[g])
            positions[r, at : at + p] = torch.arange(p)
            group_of[r, at : at + p] = g
            at += p
            for k, reply in enumerate(replies[g]):
                n = len(reply)
                ids[r, at : at + n] = torch.tensor(reply)
                positions[r, at : at + n] = torch.arange(p, p + n)
                group_of[r, at : at + n] = g
                reply_of[r, at : at + n] = k + 1
                ends.append((r, at + n - 1))
                at += n
    # Query i sees key j <= i of its own group when j is a prompt token or a token of i's own reply.
    # Built on `device`: the [rows, W, W] mask is the big tensor here (4 MB a row at W = 1,024), its inputs small.
    group_of, reply_of = group_of.to(device), reply_of.to(device)
    same_group = (group_of[:, :, None] == group_of[:, None, :]) & (group_of[:, None, :] >= 0)
    visible = (reply_of[:, None, :] == 0) | (reply_of[:, :, None] == reply_of[:, None, :])
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = (same_group & visible & causal) | torch.eye(width, dtype=torch.bool, device=device)  # a pad sees itself
    if model.config._attn_implementation == "sdpa":  # a boolean mask, whatever dtype the layers compute in
        mask = allowed[:, None]
    else:  # eager adds the mask to the scores
        mask = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
    hidden = body(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                  use_cache=False).last_hidden_state
    where = torch.tensor(ends, device=device)
    return head(hidden[where[:, 0], where[:, 1]])


@dataclass
class KWiseBatch:
    """Some prompts, each with its K replies (each once), and the pairs as indices into the replies."""

    prompts: list[list[int]]
    replies: list[list[list[int]]]
    winners: Tensor
    losers: Tensor
    pair_group: Tensor
    pad_id: int

    @property
    def num_pairs(self) -> int:
        return len(self.winners)

    def full_batch(self) -> Batch:
        """Prompt + reply rows, right-padded (one row per reply)."""
        return collate([Example(p + r, len(p)) for p, group in zip(self.prompts, self.replies) for r in group], self.pad_id)


def kwise_batch(groups: Sequence[PreferenceGroup], tokenizer: Any, budget: TokenBudget | int) -> KWiseBatch:
    """Token ids for K-wise training: one prompt and K replies per group (fitted by ``chat_data.fit_group``),
    pairs re-indexed into the replies. An int budget is ``TokenBudget(max_length)``."""
    budget = budget if isinstance(budget, TokenBudget) else TokenBudget(budget)
    prompts, replies, winners, losers, pair_group = [], [], [], [], []
    offset = 0
    for g, group in enumerate(groups):
        fitted = fit_group(tokenizer, group.prompt, group.completions, budget, group.ended)
        prompt, kept = fitted.prompt_ids, fitted.replies
        prompts.append(prompt)
        replies.append(kept)
        for w, l in group.pairs:
            winners.append(offset + w)
            losers.append(offset + l)
            pair_group.append(g)
        offset += len(kept)
    return KWiseBatch(prompts, replies, torch.tensor(winners), torch.tensor(losers), torch.tensor(pair_group),
                      pad_token_id(tokenizer))


def kwise_rewards(model: nn.Module, head: ScalarHead, kb: KWiseBatch, device: torch.device) -> Tensor:
    """One raw reward per reply of the batch; each reply (and each prompt) goes through the model once."""
    window = getattr(model.config, "sliding_window", None)
    longest = max(len(p) + max(len(r) for r in group) for p, group in zip(kb.prompts, kb.replies))
    # The block mask is a plain 4D mask: sdpa and eager take it, and a sliding window must not cut inside a row.
    if model.config._attn_implementation in ("sdpa", "eager") and (window is None or longest <= window):
        return packed_rewards(model, head, kb.prompts, kb.replies, kb.pad_id, device)
    # Another attention kernel, or a row longer than a sliding window: whole rows, each prompt once per reply.
    batch = kb.full_batch().to(device)
    return sequence_rewards(model, head, batch.input_ids, batch.attention_mask)


def kwise_loss(model: nn.Module, head: ScalarHead, kb: KWiseBatch, device: torch.device) -> tuple[Tensor, Tensor]:
    """(InstructGPT eq. 1 loss, pairwise accuracy) of one K-wise batch: the C(K,2) pairs from K scalars."""
    rewards = kwise_rewards(model, head, kb, device)
    winners, losers, groups = kb.winners.to(device), kb.losers.to(device), kb.pair_group.to(device)
    return pairwise_reward_loss(rewards, winners, losers, groups), pairwise_accuracy(rewards.detach(), winners, losers)


def accumulate_kwise_gradients(model: nn.Module, head: ScalarHead, groups: Sequence[PreferenceGroup], tokenizer: Any,
                               cfg: RewardConfig, device: torch.device) -> tuple[float, float, int]:
    """Backward of one step's eq. 1 loss, ``cfg.micro_batch_groups`` prompts at a time; (loss, accuracy, pairs).

    The loss is a mean over prompts, so a micro-batch of m of the step's n prompts is weighted m/n:
    the summed gradient equals the whole step's. Each prompt's K replies stay together.
    """
    size = cfg.micro_batch_groups or len(groups)
    if size < len(groups):  # micro-batches of similar lengths pad less; the step's gradient is the same
        groups = sorted(groups, key=lambda g: len(encode_prompt(tokenizer, g.prompt)))
    loss_sum = correct = 0.0
    pairs = 0
    for start in range(0, len(groups), size):
        kb = kwise_batch(groups[start : start + size], tokenizer, cfg.token_budget())
        loss, acc = kwise_loss(model, head, kb, device)
        weight = len(kb.prompts) / len(groups)
        (loss * weight).backward()
        loss_sum += loss.item() * weight
        correct += acc.item() * kb.num_pairs
        pairs += kb.num_pairs
    return loss_sum, correct / max(pairs, 1), pairs


@torch.no_grad()
def evaluate_pairs(model: nn.Module, head: ScalarHead, groups: Sequence[PreferenceGroup], tokenizer: Any,
                   cfg: RewardConfig, device: torch.device) -> dict[str, float]:
    """Pairwise accuracy and loss on held-out prompts (same rendering and truncation as training)."""
    correct, total, loss_sum = 0.0, 0, 0.0
    batches = _batches_by_rows(groups, cfg.eval_batch_rows)
    for chunk in tqdm(batches, desc="RM eval", disable=not cfg.progress, leave=False):
        kb = kwise_batch(chunk, tokenizer, cfg.token_budget())
        loss, acc = kwise_loss(model, head, kb, device)
        correct += acc.item() * kb.num_pairs
        loss_sum += loss.item() * kb.num_pairs
        total += kb.num_pairs
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "pairs": float(total)}


def _batches_by_rows(groups: Sequence[PreferenceGroup], rows: int) -> list[list[PreferenceGroup]]:
    batches: list[list[PreferenceGroup]] = [[]]
    for g in groups:
        if batches[-1] and sum(len(x.completions) for x in batches[-1]) + len(g.completions) > rows:
            batches.append([])
        batches[-1].append(g)
    return [b for b in batches if b]


def truncation_report(groups: Sequence[PreferenceGroup], tokenizer: Any, budget: TokenBudget) -> TruncationReport:
    """How many of these prompts and replies the token budget cuts (also checks every prompt renders)."""
    report = TruncationReport()
    for g in groups:
        fitted = fit_group(tokenizer, g.prompt, g.completions, budget, g.ended)
        report.add(fitted.prompt_cut, fitted.replies_cut)
    return report


@torch.no_grad()
def score_texts(model: nn.Module, head: ScalarHead, tokenizer: Any, prompts: Sequence[Any], replies: Sequence[str],
                budget: TokenBudget | int, device: torch.device, batch_rows: int = 32,
                ended: Sequence[bool] | None = None) -> list[float]:
    """Raw rewards of (prompt, reply) pairs, fitted to ``budget`` as in training (an int: ``TokenBudget(max_length)``);
    ``ended[i]`` False: reply i was cut off where it was generated (read without a stop token)."""
    flags = list(ended) if ended is not None else [True] * len(replies)
    scores: list[float] = []
    for start in range(0, len(prompts), batch_rows):
        rows = slice(start, start + batch_rows)
        examples = [example_for(tokenizer, p, r, budget, e)
                    for p, r, e in zip(prompts[rows], replies[rows], flags[rows], strict=True)]
        batch = collate(examples, pad_token_id(tokenizer)).to(device)
        scores += sequence_rewards(model, head, batch.input_ids, batch.attention_mask).tolist()
    return scores


def accumulate_thumbs_gradients(model: nn.Module, head: ScalarHead, threshold: Tensor, rated: Sequence[RatedReply],
                                tokenizer: Any, cfg: RewardConfig, device: torch.device) -> tuple[float, float]:
    """Backward of ``pointwise_weight`` x the 👍/👎 loss of one step's rated replies, in micro-batches of
    ``cfg.micro_batch_groups`` replies (each weighted by its share: same gradient); (loss, accuracy)."""
    size = cfg.micro_batch_groups or len(rated)
    loss_sum = correct = 0.0
    for start in range(0, len(rated), size):
        chunk = rated[start : start + size]
        rewards = rated_rewards(model, head, chunk, tokenizer, cfg.token_budget(), device)
        liked = torch.tensor([r.liked for r in chunk], device=device)
        loss = pointwise_reward_loss(rewards, liked, threshold)
        weight = len(chunk) / len(rated)
        (cfg.pointwise_weight * loss * weight).backward()
        loss_sum += loss.item() * weight
        correct += pointwise_accuracy(rewards.detach(), liked, threshold.detach()).item() * len(chunk)
    return loss_sum, correct / max(len(rated), 1)


def rated_rewards(model: nn.Module, head: ScalarHead, rated: Sequence[RatedReply], tokenizer: Any,
                  budget: TokenBudget, device: torch.device) -> Tensor:
    """Raw rewards [N] of rated replies, fitted to ``budget`` like every other example."""
    batch = collate([example_for(tokenizer, r.prompt, r.completion, budget, r.ended) for r in rated],
                    pad_token_id(tokenizer)).to(device)
    return sequence_rewards(model, head, batch.input_ids, batch.attention_mask)


@torch.no_grad()
def evaluate_thumbs(model: nn.Module, head: ScalarHead, threshold: Tensor, rated: Sequence[RatedReply],
                    tokenizer: Any, cfg: RewardConfig, device: torch.device) -> dict[str, float]:
    """👍/👎 accuracy (side of the threshold) and loss on held-out rated replies."""
    correct = loss_sum = 0.0
    for start in range(0, len(rated), cfg.eval_batch_rows):
        chunk = rated[start : start + cfg.eval_batch_rows]
        rewards = rated_rewards(model, head, chunk, tokenizer, cfg.token_budget(), device)
        liked = torch.tensor([r.liked for r in chunk], device=device)
        correct += pointwise_accuracy(rewards, liked, threshold).item() * len(chunk)
        loss_sum += pointwise_reward_loss(rewards, liked, threshold).item() * len(chunk)
    n = max(len(rated), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n, "rows": float(len(rated))}


@dataclass
class RewardResult:
    """Where the reward adapter went, its held-out accuracy and speed."""

    adapter_dir: Path
    eval_accuracy: float
    eval_loss: float
    train_pairs: int
    eval_pairs: int
    train_seconds: float
    pairs_per_second: float
    shift: float
    std: float
    truncation: TruncationReport
    thumbs_train: int = 0  # rated replies trained on (counting repeats over epochs)
    thumbs_eval_accuracy: float = float("nan")  # held-out 👍/👎 on the right side of the threshold
    threshold: float = float("nan")  # the learned 👍/👎 threshold, on the raw (unshifted) scale


def _cycle(n: int, take: int, rng: random.Random, order: list[int]) -> list[int]:
    """The next ``take`` indices of a reshuffled-every-epoch order over ``n`` items (``order`` is consumed)."""
    while len(order) < take:
        refill = list(range(n))
        rng.shuffle(refill)
        order += refill
    picked = order[:take]
    del order[:take]
    return picked


def train_reward_model(cfg: RewardConfig) -> RewardResult:
    """Train a reward adapter + head on preference data and/or 👍/👎; write it to ``cfg.output_dir``.

    Each step mixes ``groups_per_batch`` preference prompts (InstructGPT eq. 1) with
    ``thumbs_per_batch`` rated replies (:func:`training.losses.pointwise_reward_loss`, weighted by
    ``pointwise_weight``); the learned threshold is saved in ``scalar_head.json`` (``threshold``).

    Example:
        >>> train_reward_model(RewardConfig(data="prefs.jsonl", thumbs_data="thumbs.jsonl", output_dir="runs/rm-1"))  # doctest: +SKIP
    """
    if not cfg.data and not cfg.thumbs_data:
        raise DataError("The reward model needs preferences or 👍/👎: pass data=PATH (`alignloop db export preferences "
                        "--format groups`) and/or thumbs_data=PATH (`alignloop db export --kind thumbs`).")
    groups = preference_groups(read_rows(cfg.data)) if cfg.data else []
    if cfg.data and not groups:
        raise DataError(f"{cfg.data} has no usable preference pairs.")
    rated = rated_replies(read_rows(cfg.thumbs_data)) if cfg.thumbs_data else []
    budget = cfg.token_budget()
    out = fresh_dir(cfg.output_dir)
    cfg.save(out)
    torch.manual_seed(cfg.seed)
    train, held_out = split_rows(groups, cfg.eval_fraction, cfg.seed)  # whole prompts, never single pairs
    thumbs_train, thumbs_held = split_rows(rated, cfg.eval_fraction, cfg.seed)
    base, tokenizer, device = load_base(cfg)
    # A prompt the chat template refuses fails now, not halfway through training.
    truncation = truncation_report(groups, tokenizer, budget)
    for r in rated:
        example = example_for(tokenizer, r.prompt, r.completion, budget)
        truncation.add(example.prompt_cut, [example.reply_cut])
    model = attach_adapter(base, "default", cfg.init_adapter or None, cfg.lora, trainable=True)
    info: dict[str, Any] = {}
    if cfg.init_adapter:
        head, info = load_head(cfg.init_adapter, device)  # warm start: LoRA and head from the previous RM
    else:
        head = ScalarHead(model.get_base_model().config.hidden_size).to(device)
    # τ starts where the previous RM put it, else at its reference replies' mean reward (its shift), else 0.
    threshold = nn.Parameter(torch.tensor(float(info.get("threshold", info.get("shift", 0.0))), device=device))
    params = adapter_parameters(model, "default") + list(head.parameters())
    optimizer = torch.optim.AdamW(params + ([threshold] if rated else []), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.groups_per_batch) if train else 0,
                math.ceil(cfg.epochs * len(thumbs_train) / cfg.thumbs_per_batch) if thumbs_train else 0)
    log = MetricsLog(out, cfg.to_dict())
    log.log(0, truncation.as_metrics("data"))
    rng = random.Random(cfg.seed)
    group_order: list[int] = []
    thumbs_order: list[int] = []
    pairs_seen = thumbs_seen = 0
    model.train()
    started = time.perf_counter()
    for step in tracked(range(steps), "reward model", show_bar=cfg.progress):
        optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        if train:
            chunk = [train[i] for i in _cycle(len(train), min(cfg.groups_per_batch, len(train)), rng, group_order)]
            loss, acc, pairs = accumulate_kwise_gradients(model, head, chunk, tokenizer, cfg, device)
            pairs_seen += pairs
            metrics.update({"rm/loss": loss, "rm/accuracy": acc})
        if thumbs_train:
            rows = [thumbs_train[i] for i in _cycle(len(thumbs_train), min(cfg.thumbs_per_batch, len(thumbs_train)),
                                                     rng, thumbs_order)]
            loss, acc = accumulate_thumbs_gradients(model, head, threshold, rows, tokenizer, cfg, device)
            thumbs_seen += len(rows)
            metrics.update({"rm/thumbs_loss": loss, "rm/thumbs_accuracy": acc, "rm/threshold": threshold.item()})
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        release_freed_memory()
        log.log(step, {**metrics, "rm/grad_norm": float(grad_norm),
                       "rm/pairs_per_s": pairs_seen / (time.perf_counter() - started)})
    train_seconds = time.perf_counter() - started
    model.eval()
    nan = float("nan")
    metrics = evaluate_pairs(model, head, held_out, tokenizer, cfg, device) if held_out else {"accuracy": nan, "loss": nan, "pairs": 0.0}
    thumbs = (evaluate_thumbs(model, head, threshold, thumbs_held, tokenizer, cfg, device) if thumbs_held
              else {"accuracy": nan, "loss": nan, "rows": 0.0})
    references = [(g.prompt, g.completions[w]) for g in train for w in sorted({w for w, _ in g.pairs})]
    references += [(r.prompt, r.completion) for r in thumbs_train if r.liked]
    shift, std = reward_normalisation(model, head, tokenizer, cfg, references, device)
    log.log(steps, {"rm/eval_accuracy": metrics["accuracy"], "rm/eval_loss": metrics["loss"],
                    "rm/thumbs_eval_accuracy": thumbs["accuracy"], "rm/thumbs_eval_loss": thumbs["loss"],
                    "rm/shift": shift, "rm/std": std})
    log.close()
    save_adapter(model, "default", out)
    head_info = {"shift": shift, "std": std, "eval_accuracy": metrics["accuracy"], "eval_pairs": int(metrics["pairs"]),
                 "base_model": str(cfg.base_model)}
    if rated or "threshold" in info:
        head_info.update({"threshold": threshold.item(), "thumbs_eval_accuracy": thumbs["accuracy"],
                          "thumbs_eval_rows": int(thumbs["rows"])})
    save_head(head, out, head_info)
    return RewardResult(out, metrics["accuracy"], metrics["loss"], pairs_seen, int(metrics["pairs"]), train_seconds,
                        pairs_seen / train_seconds, shift, std, truncation, thumbs_seen, thumbs["accuracy"],
                        threshold.item() if rated or "threshold" in info else nan)


def reward_normalisation(model: nn.Module, head: ScalarHead, tokenizer: Any, cfg: RewardConfig,
                         references: Sequence[tuple[Any, str]], device: torch.device,
                         limit: int = 256) -> tuple[float, float]:
    """(shift, std): the mean and std of raw rewards of reference replies.

    InstructGPT: "we normalize the reward model using a bias so that the labeler
    demonstrations achieve a mean score of 0". References are ``cfg.reference_data``
    (SFT rows), else ``references`` (every reply that wins a pair, and every liked reply).
    """
    pairs = [sft_pair(row) for row in read_rows(cfg.reference_data)] if cfg.reference_data else list(references)
    pairs = pairs[:limit]
    if not pairs:
        return 0.0, 1.0
    scores = torch.tensor(score_texts(model, head, tokenizer, [p for p, _ in pairs], [r for _, r in pairs],
                                      cfg.token_budget(), device, cfg.eval_batch_rows))
    std = scores.std().item() if len(scores) > 1 else 1.0
    return scores.mean().item(), std


class RewardModel:
    """A trained reward adapter ready to score: ``rm.score(prompts, replies)`` → shifted rewards.

    Example:
        >>> rm = RewardModel.load("runs/rm-1")  # doctest: +SKIP
        >>> rm.score(["Hi"], ["Hello! How can I help?"])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, head: ScalarHead, tokenizer: Any, info: dict[str, Any], device: torch.device,
                 budget: TokenBudget | int = 512):
        self.model, self.head, self.tokenizer, self.info = model, head, tokenizer, info
        self.device = device
        self.budget = budget if isinstance(budget, TokenBudget) else TokenBudget(budget)

    @property
    def shift(self) -> float:
        return float(self.info.get("shift", 0.0))

    @property
    def threshold(self) -> float:
        """The learned 👍/👎 threshold on the scale of :meth:`score` (NaN if trained without 👍/👎)."""
        return float(self.info.get("threshold", float("nan"))) - self.shift

    @classmethod
    def load(cls, folder: str | Path, base_model: str | None = None, device: str = "auto") -> RewardModel:
        """Load a reward adapter folder written by :func:`train_reward_model` on its base model."""
        import json

        folder = Path(folder)
        saved = json.loads((folder / "train_config.json").read_text()) if (folder / "train_config.json").is_file() else {}
        cfg = RewardConfig(base_model=base_model or saved.get("base_model", "default"), device=device,
                           **{k: saved[k] for k in ("max_length", "max_prompt_tokens", "max_reply_tokens") if k in saved})
        base, tokenizer, dev = load_base(cfg)
        model = attach_adapter(base, "default", folder, cfg.lora, trainable=False)
        model.eval()
        head, info = load_head(folder, dev)
        return cls(model, head, tokenizer, info, dev, cfg.token_budget())  # scored with the budget it was trained with

    def score(self, prompts: Sequence[Any], replies: Sequence[str], ended: Sequence[bool] | None = None) -> list[float]:
        """Rewards of (prompt, reply) pairs, shifted so reference replies average 0. ``ended[i]`` False: reply i
        was cut off at a token limit (read without a stop token, as in training); default: all ended."""
        raw = score_texts(self.model, self.head, self.tokenizer, prompts, replies, self.budget, self.device,
                          ended=ended)
        return [r - self.shift for r in raw]
