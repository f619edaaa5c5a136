"""Supervised fine-tuning (InstructGPT step 1): demonstrations → a policy LoRA adapter.

The loss is the NLL of the reply tokens only (its stop token included, unless
truncation cut the reply: then there is no stop target), with prompts rendered by
the same chat template the server uses and fitted by the one truncation rule
(``chat_data.fit_group``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.adapters import adapter_parameters, attach_adapter, fresh_dir, load_base, save_adapter
from training.chat_data import (DataError, Example, TruncationReport, collate, example_for, pad_token_id, read_rows,
                                sft_pair)
from training.config import SFTConfig, TokenBudget
from training.logprobs import token_logprobs
from training.losses import token_nll
from training.memory import release_freed_memory
from training.metrics_log import MetricsLog
from training.progress import tracked


@dataclass
class SFTResult:
    """Where the adapter went and how training went."""

    adapter_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    truncation: TruncationReport


def sft_examples(rows: list[dict], tokenizer, budget: TokenBudget) -> tuple[list[Example], TruncationReport]:
    """Demonstration rows as template-rendered prompt + reply examples, and how many were cut."""
    examples, report = [], TruncationReport()
    for row in rows:
        prompt, reply = sft_pair(row)
        example = example_for(tokenizer, prompt, reply, budget)
        report.add(example.prompt_cut, [example.reply_cut])
        examples.append(example)
    return examples, report


def train_sft(cfg: SFTConfig) -> SFTResult:
    """Train a LoRA policy adapter on demonstrations; write it to ``cfg.output_dir``.

    Example:
        >>> train_sft(SFTConfig(data="sft.jsonl", output_dir="runs/sft-1"))  # doctest: +SKIP
    """
    if not cfg.data:
        raise DataError("SFT needs demonstrations: pass data=PATH (e.g. from `alignloop db export sft`).")
    out = fresh_dir(cfg.output_dir)
    cfg.save(out)
    torch.manual_seed(cfg.seed)
    budget = cfg.token_budget()  # a budget that cannot fit fails before the model loads
    base, tokenizer, device = load_base(cfg)
    model = attach_adapter(base, "default", cfg.init_adapter or None, cfg.lora, trainable=True)
    params = adapter_parameters(model, "default")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    examples, truncation = sft_examples(read_rows(cfg.data), tokenizer, budget)
    steps = max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    log = MetricsLog(out, cfg.to_dict())
    log.log(0, truncation.as_metrics("data"))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in tracked(range(steps), "SFT", show_bar=cfg.progress):
        if len(order) < cfg.batch_size:
            refill = list(range(len(examples)))
            rng.shuffle(refill)
            order += refill
        batch = collate([examples[i] for i in order[: cfg.batch_size]], pad_token_id(tokenizer)).to(device)
        del order[: cfg.batch_size]
        logprobs, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.reply_mask, chunk=cfg.logits_chunk)
        loss = token_nll(logprobs, batch.reply_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        release_freed_memory()
        losses.append(loss.item())
        log.log(step, {"sft/loss": loss.item(), "sft/grad_norm": float(grad_norm),
                       "sft/reply_tokens": float(batch.reply_mask.sum())})
    model.eval()
    save_adapter(model, "default", out)
    log.close()
    return SFTResult(out, steps, losses[0], losses[-1], time.perf_counter() - started, truncation)
