"""Turn prompts and replies into token ids exactly as the chat server renders them.

The prompt goes through the tokenizer's chat template with the generation
prompt (``<start_of_turn>model\\n`` for Gemma), as vLLM and the HF engine do;
the reply is its text followed by one stop token (``<end_of_turn>`` when the
vocabulary has it, else EOS), which is what the model emits when it is done.

Truncation is one rule (:func:`fit_group`, :func:`fit_prompt`, numbers from
``config.TokenBudget``), used by SFT, the reward model (training and scoring) and
PPO (sampler and scorer see the same prompt ids):

* the reply is kept whole up to its budget; a longer one keeps its first tokens
  and loses its stop token (no stop target in SFT; the reward model reads it at
  its last kept token);
* the prompt is cut from the left to its budget: whole oldest turns first, keeping
  BOS and the system turn; only when the newest user turn alone is too long are its
  oldest tokens cut, still keeping BOS + system turn and the generation prompt.
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

from training.base_models import END_OF_TURN, START_OF_TURN
from training.config import TokenBudget

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
    """Every id that ends a reply (EOS, ``<end_of_turn>``, and ``<start_of_turn>``: a small model sometimes
    opens the next turn without closing its own), the main one first."""
    ids = [stop_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    start = tokenizer.encode(START_OF_TURN, add_special_tokens=False)
    if len(start) == 1 and start[0] != tokenizer.unk_token_id and start[0] not in ids:
        ids.append(start[0])
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The pad id (EOS when the tokenizer has none; masks, not ids, say what is padding)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _render(tokenizer: Any, messages: Messages) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError: e.g. roles that do not alternate
        shown = json.dumps(messages, ensure_ascii=False)[:300]
        raise DataError(f"The chat template refuses this prompt ({exc}): {shown}. Fix or drop that row.") from exc


def encode_prompt(tokenizer: Any, prompt: str | Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a whole prompt rendered with the chat template and the generation prompt (never cut)."""
    return tokenizer(_render(tokenizer, to_messages(prompt)), add_special_tokens=False)["input_ids"]


def encode_reply(tokenizer: Any, reply: str, ended: bool = True) -> list[int]:
    """Token ids of a reply body plus the stop token, as the model would emit them; without it when the
    reply did not end (``ended`` False: the server cut it off at its token limit, as PPO's rollouts are).

    The body is trimmed like the chat template trims assistant content.
    """
    body = tokenizer(reply.strip(), add_special_tokens=False)["input_ids"]
    return body + [stop_token_id(tokenizer)] if ended else body


# --------------------------------------------------------------------------- #
# Truncation: the one rule for SFT, the reward model, PPO and its sampler
# --------------------------------------------------------------------------- #


def fit_reply(reply_ids: Sequence[int], max_reply_tokens: int) -> tuple[list[int], bool]:
    """A reply (body + stop token) kept whole if it fits ``max_reply_tokens``, else its first
    ``max_reply_tokens`` tokens without the stop token; returns (ids, whether it was cut).

    A cut reply has no stop token: SFT then never teaches the model to stop mid-sentence,
    and the reward model reads a cut reply at its last kept token.
    """
    if len(reply_ids) <= max_reply_tokens:
        return list(reply_ids), False
    return list(reply_ids[:max_reply_tokens]), True


def keep_newest(ids: Sequence[int], budget: int, head: int, tail: int) -> list[int]:
    """``ids`` cut to ``budget`` tokens from the left of its middle: the first ``head`` ids
    (BOS, system turn) and the last ``tail`` ids (end of turn + generation prompt) stay, and
    the middle keeps its newest tokens. When head + tail alone exceed the budget, only BOS
    (the first id) and the newest ``budget - 1`` ids stay."""
    if len(ids) <= budget:
        return list(ids)
    room = budget - head - tail
    if room < 0:
        return [ids[0]] + list(ids[len(ids) - budget + 1 :])
    return list(ids[:head]) + list(ids[len(ids) - tail - room : len(ids) - tail]) + list(ids[len(ids) - tail :])


@dataclass
class FittedPrompt:
    """A prompt's ids within its budget, and what had to go."""

    ids: list[int]
    turns_dropped: int = 0  # whole oldest turns left out
    tokens_cut: int = 0  # oldest tokens cut from the newest turn (only when it alone is too long)

    @property
    def cut(self) -> bool:
        return bool(self.turns_dropped or self.tokens_cut)


def fit_prompt(tokenizer: Any, prompt: str | Sequence[dict[str, Any]], max_prompt_tokens: int) -> FittedPrompt:
    """The prompt's ids (chat template + generation prompt) within ``max_prompt_tokens``.

    Whole oldest turns go first (the system turn and BOS stay; the conversation still
    starts with a user turn, as templates require). If the newest user turn alone is too
    long, its oldest tokens are cut, keeping BOS + system turn before it and its end of
    turn + generation prompt (``<start_of_turn>model\\n``) after it.
    """
    messages = to_messages(prompt)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    text = _render(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dropped = 0
    while len(ids) > max_prompt_tokens and len(turns) > 1:
        turns = turns[1:]
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with the user
            turns = turns[1:]
            dropped += 1
        text = _render(tokenizer, system + turns)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_prompt_tokens:
        return FittedPrompt(ids, dropped)
    # The newest turn alone is too long: split the rendered text around its content, cut that.
    content = turns[-1]["content"].strip() if turns else ""
    at = text.rfind(content) if content else -1
    if at < 0:
        kept = keep_newest(ids, max_prompt_tokens, 1, 0)
        return FittedPrompt(kept, dropped, len(ids) - len(kept))
    head = tokenizer(text[:at], add_special_tokens=False)["input_ids"]
    body = tokenizer(content, add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[at + len(content) :], add_special_tokens=False)["input_ids"]
    pieces = head + body + tail
    kept = keep_newest(pieces, max_prompt_tokens, len(head), len(tail))
    return FittedPrompt(kept, dropped, len(pieces) - len(kept))


def encode_prompt_fitted(tokenizer: Any, prompt: str | Sequence[dict[str, Any]], max_prompt_tokens: int) -> list[int]:
    """Token ids of a prompt for generation, within ``max_prompt_tokens`` (see :func:`fit_prompt`).

    Every sampler and scorer of a prompt uses these ids, so they all see the same prompt.
    """
    return fit_prompt(tokenizer, prompt, max_prompt_tokens).ids


@dataclass
class FittedGroup:
    """One prompt and its K replies, all within the token budget, sharing one prompt prefix."""

    prompt_ids: list[int]
    replies: list[list[int]]
    prompt_cut: bool
    replies_cut: list[bool]


def fit_group(tokenizer: Any, prompt: str | Sequence[dict[str, Any]], replies: Sequence[str],
              budget: TokenBudget, ended: Sequence[bool] | None = None) -> FittedGroup:
    """Prompt + K replies under ``budget``: each reply by :func:`fit_reply`, then the prompt
    by :func:`fit_prompt` to what the longest kept reply leaves. With K = 1 this is an SFT
    or reward example; the PPO sampler uses :func:`fit_prompt` with ``budget.generation_prompt``.
    ``ended[i]`` False: reply i was cut off where it was generated and gets no stop token (default: all ended)."""
    flags = list(ended) if ended else [True] * len(replies)
    kept = [fit_reply(encode_reply(tokenizer, r, e), budget.reply) for r, e in zip(replies, flags, strict=True)]
    longest = max((len(ids) for ids, _ in kept), default=0)
    fitted = fit_prompt(tokenizer, prompt, budget.prompt(longest))
    return FittedGroup(fitted.ids, [ids for ids, _ in kept], fitted.cut, [cut for _, cut in kept])


@dataclass
class Example:
    """One prompt + reply: ids, how many of them are the prompt, and what truncation did."""

    input_ids: list[int]
    prompt_length: int
    prompt_cut: bool = False
    reply_cut: bool = False

    @property
    def reply_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


def example_for(tokenizer: Any, prompt: str | Sequence[dict[str, Any]], reply: str, budget: TokenBudget | int,
                ended: bool = True) -> Example:
    """Template-rendered prompt + reply (+ stop token unless the reply was cut, here or where it was
    generated: ``ended`` False), within ``budget`` (an int is ``TokenBudget(max_length)``)."""
    budget = budget if isinstance(budget, TokenBudget) else TokenBudget(budget)
    group = fit_group(tokenizer, prompt, [reply], budget, [ended])
    return Example(group.prompt_ids + group.replies[0], len(group.prompt_ids), group.prompt_cut, group.replies_cut[0])


@dataclass
class TruncationReport:
    """How many prompts and replies truncation cut (logged by SFT and the reward model)."""

    prompts: int = 0
    prompts_cut: int = 0
    replies: int = 0
    replies_cut: int = 0

    def add(self, prompt_cut: bool, replies_cut: Sequence[bool]) -> None:
        self.prompts += 1
        self.prompts_cut += int(prompt_cut)
        self.replies += len(replies_cut)
        self.replies_cut += sum(map(int, replies_cut))

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/prompts_cut": float(self.prompts_cut), f"{prefix}/replies_cut": float(self.replies_cut),
                f"{prefix}/prompts": float(self.prompts), f"{prefix}/replies": float(self.replies)}


@dataclass
class Batch:
    """Right-padded examples: ids, attention mask, and the reply-token mask (targets)."""

    input_ids: Tensor
    attention_mask: Tensor
    reply_mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.reply_mask.to(device))


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples into tensors; ``reply_mask`` is 1 on reply tokens (stop token included when kept)."""
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
    ended: list[bool] = field(default_factory=list)  # per completion (empty: all ended); False: cut off when served


def preference_groups(rows: Iterable[dict[str, Any]]) -> list[PreferenceGroup]:
    """Group preference rows per prompt.

    Accepts feedback_db's groups ({'prompt', 'completions', 'pairs'}) and TRL pairs
    ({'prompt', 'chosen', 'rejected'}, with 'chosen_ended'/'rejected_ended' false for a reply the
    server cut off; absent: ended); pairs of the same prompt are merged, each distinct reply
    appearing once, so it goes through the model once.
    """
    groups: dict[str, PreferenceGroup] = {}
    for n, row in enumerate(rows, 1):
        if "completions" in row and "pairs" in row:
            ended = row.get("ended") or []
            if ended and (len(ended) != len(row["completions"]) or not all(isinstance(e, bool) for e in ended)):
                raise DataError(f"Preference row {n}: 'ended' must hold one true/false per completion, got {ended!r}.")
            group = PreferenceGroup(to_messages(row["prompt"]), [_reply_text(c) for c in row["completions"]],
                                    [tuple(p) for p in row["pairs"]], list(ended))
            groups[f"group-{n}"] = group
            continue
        if not {"prompt", "chosen", "rejected"} <= set(row):
            raise DataError(f"Preference row {n} needs 'prompt', 'chosen', 'rejected' (or 'completions', 'pairs').")
        prompt = to_messages(row["prompt"])
        key = json.dumps(prompt, sort_keys=True)
        group = groups.setdefault(key, PreferenceGroup(prompt, []))
        winner, loser = _reply_text(row["chosen"]), _reply_text(row["rejected"])
        ends = row.get("chosen_ended", True), row.get("rejected_ended", True)
        if not all(isinstance(e, bool) for e in ends):
            raise DataError(f"Preference row {n}: 'chosen_ended' and 'rejected_ended' must be true or false, got {ends!r}.")
        if winner.strip() == loser.strip():
            continue  # no signal
        for text, ended in zip((winner, loser), ends):
            if text not in group.completions:
                group.completions.append(text)
                group.ended.append(ended)
        group.pairs.append((group.completions.index(winner), group.completions.index(loser)))
    return [g for g in groups.values() if g.pairs]


@dataclass
class RatedReply:
    """One reply rated on its own (👍 liked, 👎 not), unpaired."""

    prompt: Messages
    completion: str
    liked: bool
    ended: bool = True  # False: the server cut the reply off at its token limit


def rated_replies(rows: Iterable[dict[str, Any]]) -> list[RatedReply]:
    """Rows in TRL's unpaired-preference (KTO) format, {'prompt', 'completion', 'label': bool},
    as rated replies (`alignloop db export --kind thumbs` writes them)."""
    rated = []
    for n, row in enumerate(rows, 1):
        if not {"prompt", "completion", "label"} <= set(row):
            raise DataError(f"Thumbs row {n} needs 'prompt', 'completion' and 'label' (true for 👍, false for 👎); "
                            f"got keys {sorted(row)}.")
        label = row["label"]
        if label not in (True, False, 0, 1):
            raise DataError(f"Thumbs row {n}: 'label' must be true or false, got {label!r}.")
        ended = row.get("ended", True)
        if ended not in (True, False):
            raise DataError(f"Thumbs row {n}: 'ended' must be true or false, got {ended!r}.")
        rated.append(RatedReply(to_messages(row["prompt"]), _reply_text(row["completion"]), bool(label), ended))
    return rated


def split_rows(rows: list[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle rows with ``seed`` and hold out ``eval_fraction`` of them (at least one when asked, never all)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(rows) > 1:
        n_eval = max(1, min(n_eval, len(rows) - 1))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


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
