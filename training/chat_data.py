"""Turn prompts and replies into token ids exactly as the chat server renders them.

The prompt goes through the tokenizer's chat template with the generation
prompt (``<start_of_turn>model\\n`` for Gemma), as vLLM and the HF engine do;
the reply is its text followed by one stop token (``<end_of_turn>`` when the
vocabulary has it, else EOS), which is what the model emits when it is done.
Truncation shortens the reply body but always keeps that stop token, so the
reward model always reads its score at a stop token, in training and in use.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.base_models import END_OF_TURN

Messages = list[dict[str, str]]

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(ValueError):
    """A data file or row has the wrong shape; the message says which and what is expected."""


# --------------------------------------------------------------------------- #
# Prompts and stop tokens
# --------------------------------------------------------------------------- #


def to_messages(prompt: str | Sequence[dict[str, Any]]) -> Messages:
    """A prompt as chat messages: a string is one user turn (Anthropic HH transcripts
    "\\n\\nHuman: ... \\n\\nAssistant:" are split into their turns); lists are copied."""
    if isinstance(prompt, str):
        if prompt.lstrip("\n").startswith("Human:"):
            parts = _HH_TURN.split("\n\n" + prompt.lstrip("\n"))
            messages = [
                {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
                for role, text in zip(parts[1::2], parts[2::2])
            ]
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages.pop()  # the trailing "Assistant:" is the generation prompt
            if messages:
                return _alternating(messages)
        return [{"role": "user", "content": prompt}]
    messages = []
    for m in prompt:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"A prompt message must be {{'role', 'content'}}, got {m!r}.")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _alternating(messages: Messages) -> Messages:
    """Merge consecutive turns of one speaker (a few HH transcripts have "Assistant:" twice in a row);
    chat templates insist on user/assistant alternation."""
    merged: Messages = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": f"{merged[-1]['content']}\n\n{m['content']}".strip()}
        else:
            merged.append(dict(m))
    return merged


def stop_token_id(tokenizer: Any) -> int:
    """The token that ends a reply: ``<end_of_turn>`` if it is one token, else EOS."""
    ids = tokenizer.encode(END_OF_TURN, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return ids[0]
    if tokenizer.eos_token_id is None:
        raise DataError("The tokenizer has neither <end_of_turn> nor an EOS token; prepare the model with alignloop.")
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Every id that ends a reply (EOS and ``<end_of_turn>``), the main one first."""
    ids = [stop_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The pad id (EOS when the tokenizer has none; masks, not ids, say what is padding)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_prompt(tokenizer: Any, prompt: str | Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt rendered with the chat template and the generation prompt."""
    messages = to_messages(prompt)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError: e.g. roles that do not alternate
        shown = json.dumps(messages, ensure_ascii=False)[:300]
        raise DataError(f"The chat template refuses this prompt ({exc}): {shown}. Fix or drop that row.") from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_reply(tokenizer: Any, reply: str) -> list[int]:
    """Token ids of a reply body plus the stop token, as the model would emit them.

    The body is trimmed like the chat template trims assistant content.
    """
    return tokenizer(reply.strip(), add_special_tokens=False)["input_ids"] + [stop_token_id(tokenizer)]


# --------------------------------------------------------------------------- #
# Examples
# --------------------------------------------------------------------------- #


@dataclass
class Example:
    """One prompt + reply: ids, and how many of them are the prompt."""

    input_ids: list[int]
    prompt_length: int

    @property
    def reply_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


def build_example(prompt_ids: list[int], reply_ids: list[int], max_length: int, min_reply: int = 16) -> Example:
    """Join prompt and reply ids, truncating to ``max_length`` while keeping the reply's last (stop) token.

    The reply keeps at least ``min(len(reply), min_reply)`` tokens; if the prompt is
    still too long it loses its oldest tokens after the first (BOS).
    """
    if len(prompt_ids) + len(reply_ids) <= max_length:
        return Example(list(prompt_ids) + list(reply_ids), len(prompt_ids))
    keep_reply = max(min(len(reply_ids), min_reply), max_length - len(prompt_ids))
    keep_reply = min(keep_reply, len(reply_ids), max_length - 1)
    reply = list(reply_ids[: keep_reply - 1]) + [reply_ids[-1]]  # the stop token survives truncation
    room = max_length - len(reply)
    prompt = list(prompt_ids) if len(prompt_ids) <= room else [prompt_ids[0]] + list(prompt_ids[len(prompt_ids) - room + 1 :])
    return Example(prompt + reply, len(prompt))


def build_group(prompt_ids: list[int], replies: Sequence[list[int]], max_length: int,
                min_reply: int = 16) -> tuple[list[int], list[list[int]]]:
    """One prompt shared by K replies, each prompt + reply within ``max_length``.

    Each reply is cut as :func:`build_example` would (keeping its stop token); the prompt
    is then cut once, for the longest reply, so all K replies share the same prefix.
    With K = 1 this gives exactly :func:`build_example`'s ids.
    """
    cut = [build_example(prompt_ids, r, max_length, min_reply) for r in replies]
    kept = [e.input_ids[e.prompt_length :] for e in cut]
    room = max_length - max(len(r) for r in kept)
    prompt = list(prompt_ids) if len(prompt_ids) <= room else [prompt_ids[0]] + list(prompt_ids[len(prompt_ids) - room + 1 :])
    return prompt, kept


def example_for(tokenizer: Any, prompt: str | Sequence[dict[str, Any]], reply: str, max_length: int) -> Example:
    """Template-rendered prompt + reply + stop token, truncated to ``max_length``."""
    return build_example(encode_prompt(tokenizer, prompt), encode_reply(tokenizer, reply), max_length)


@dataclass
class Batch:
    """Right-padded examples: ids, attention mask, and the reply-token mask (targets)."""

    input_ids: Tensor
    attention_mask: Tensor
    reply_mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.reply_mask.to(device))


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples into tensors; ``reply_mask`` is 1 on reply tokens (stop token included)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    reply = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        reply[i, e.prompt_length : n] = 1
    return Batch(ids, attention, reply)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad prompts for generation: (ids, attention mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s))
            attention[i, width - len(s) :] = 1
    return ids, attention


# --------------------------------------------------------------------------- #
# Data files
# --------------------------------------------------------------------------- #


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.jsonl.gz`` file (via feedback_db's reader)."""
    from feedback_db import read_jsonl

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"No data file at {path}. Export one with `alignloop db export ...`, or check the path.")
    rows = list(read_jsonl(path))
    if not rows:
        raise DataError(f"{path} has no rows.")
    return rows


def sft_pair(row: dict[str, Any]) -> tuple[Messages, str]:
    """(prompt messages, reply) from an SFT row: {'messages': [..., assistant]} or {'prompt', 'completion'}."""
    if "messages" in row:
        messages = to_messages(row["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError("An SFT row's 'messages' must end with the assistant reply to learn.")
        return messages[:-1], messages[-1]["content"]
    if "prompt" in row and "completion" in row:
        return to_messages(row["prompt"]), _reply_text(row["completion"])
    raise DataError(f"An SFT row needs 'messages' or 'prompt' + 'completion'; got keys {sorted(row)}.")


def _reply_text(value: str | list[dict[str, Any]]) -> str:
    if isinstance(value, str):
        return value
    for m in value:
        if m.get("role") == "assistant":
            return m["content"]
    raise DataError(f"A completion list has no assistant message: {value!r}.")


@dataclass
class PreferenceGroup:
    """One prompt's K replies and its preference pairs (winner index, loser index)."""

    prompt: Messages
    completions: list[str]
    pairs: list[tuple[int, int]] = field(default_factory=list)


def preference_groups(rows: Iterable[dict[str, Any]]) -> list[PreferenceGroup]:
    """Group preference rows per prompt.

    Accepts feedback_db's groups ({'prompt', 'completions', 'pairs'}) and TRL pairs
    ({'prompt', 'chosen', 'rejected'}); pairs of the same prompt are merged, each
    distinct reply appearing once, so it goes through the model once.
    """
    groups: dict[str, PreferenceGroup] = {}
    for n, row in enumerate(rows, 1):
        if "completions" in row and "pairs" in row:
            group = PreferenceGroup(to_messages(row["prompt"]), [_reply_text(c) for c in row["completions"]],
                                    [tuple(p) for p in row["pairs"]])
            groups[f"group-{n}"] = group
            continue
        if not {"prompt", "chosen", "rejected"} <= set(row):
            raise DataError(f"Preference row {n} needs 'prompt', 'chosen', 'rejected' (or 'completions', 'pairs').")
        prompt = to_messages(row["prompt"])
        key = json.dumps(prompt, sort_keys=True)
        group = groups.setdefault(key, PreferenceGroup(prompt, []))
        winner, loser = _reply_text(row["chosen"]), _reply_text(row["rejected"])
        if winner.strip() == loser.strip():
            continue  # no signal
        for text in (winner, loser):
            if text not in group.completions:
                group.completions.append(text)
        group.pairs.append((group.completions.index(winner), group.completions.index(loser)))
    return [g for g in groups.values() if g.pairs]


def split_groups(groups: list[PreferenceGroup], eval_fraction: float, seed: int) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """Shuffle prompts with ``seed`` and hold out ``eval_fraction`` of them (whole prompts, never single pairs)."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(groups) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(groups) > 1:
        n_eval = max(1, min(n_eval, len(groups) - 1))
    held = [groups[i] for i in order[:n_eval]]
    train = [groups[i] for i in order[n_eval:]]
    return train, held


def pretraining_texts(path: str | Path, tokenizer: Any) -> list[str]:
    """Documents for the ptx term: lines of a ``.txt`` file, or JSONL rows
    ('text' fields, or SFT rows rendered as whole conversations with the chat template)."""
    path = Path(path).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"No pretraining text at {path}.")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = []
        for row in read_rows(path):
            if isinstance(row.get("text"), str):
                texts.append(row["text"])
            else:
                prompt, reply = sft_pair(row)
                texts.append(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False))
    if not texts:
        raise DataError(f"{path} has no documents for the ptx term.")
    return texts


def encode_text(tokenizer: Any, text: str, max_length: int) -> Example:
    """A pretraining document as ids (BOS added unless the text starts with it); every token but the first is a target."""
    ids = tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))["input_ids"][:max_length]
    return Example(ids, 1)
