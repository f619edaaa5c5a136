"""Evaluating a round's models: greedy replies of candidate and live, reward-model accuracy."""

from __future__ import annotations

from typing import Any

from training.config import SFTConfig


def reward_accuracy(rm: Any, groups: list[Any]) -> float:
    """Pairwise accuracy of a loaded RewardModel on preference groups (ties count as wrong)."""
    correct = total = 0
    for g in groups:
        scores = rm.score([g.prompt] * len(g.completions), g.completions)
        for w, lose in g.pairs:
            correct += scores[w] > scores[lose]
            total += 1
    return correct / total if total else float("nan")


def greedy_replies(base_model: str, device: str, adapters: dict[str, str | None], prompts: list[Any],
                   max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy replies of each named adapter (None: the bare base) on the same prompts, one base in memory."""
    import torch

    from training.adapters import attach_adapter, load_base, use_adapter
    from training.chat_data import encode_prompt, left_pad, pad_token_id, stop_token_ids

    base, tok, dev = load_base(SFTConfig(base_model=base_model, device=device))
    model = base
    for name, folder in adapters.items():
        if folder:
            model = attach_adapter(model, name, folder, None, trainable=False)
    model.eval()
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], pad_token_id(tok))
    stops = stop_token_ids(tok)
    out: dict[str, list[str]] = {}
    for name, folder in adapters.items():
        with torch.no_grad():
            kwargs = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_token_id(tok))
            if folder:
                use_adapter(model, name, set())
                gen = model.generate(**kwargs)
            elif model is base:
                gen = model.generate(**kwargs)
            else:
                with model.disable_adapter():
                    gen = model.generate(**kwargs)
        out[name] = [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in gen.cpu()]
    return out
