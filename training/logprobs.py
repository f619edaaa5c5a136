"""Log-probabilities of chosen tokens without materialising batch × seq × vocab logits.

Gemma 3 has a 262k vocabulary: the full logits of a batch of 16 × 512 tokens
would take 8.6 GB in float32. So we run the transformer body once to get hidden
states, keep only the rows whose next token we score (reply tokens), and
project them through the LM head a chunk at a time. With gradients on, each
chunk is checkpointed, so backward recomputes its logits instead of keeping them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.losses import entropy_from_logits


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(transformer body, LM head, final logit soft-cap) of a causal LM, peft-wrapped or not.

    LoRA layers live inside the body, so the body runs whichever adapter is active.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), softcap


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last-layer hidden states [batch, seq, hidden] of the active adapter.

    Position ids come from the attention mask, so left-padded prompts get the
    same positions as in ``generate`` (a plain forward would count the pads).
    """
    body, _, _ = causal_lm_parts(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def _chunk_logprobs(rows: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None,
                    temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor]:
    logits = lm_head(rows).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature  # the sampling temperature, so log-probs match the sampled distribution
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else torch.zeros_like(logprobs)
    return logprobs, entropy


def rows_logprobs(rows: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None = None,
                  temperature: float = 1.0, chunk: int = 128, with_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """log π(target | hidden row) for [N, hidden] rows, ``chunk`` rows at a time; also the entropy if asked."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to compute log-probs, got {temperature}.")
    logprobs, entropies = [], []
    for start in range(0, rows.shape[0], chunk):
        args = (rows[start : start + chunk], targets[start : start + chunk], lm_head, softcap, temperature, with_entropy)
        if torch.is_grad_enabled() and rows.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = rows.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
                   temperature: float = 1.0, chunk: int = 128, with_entropy: bool = False,
                   hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log π(x_t | x_<t) at the positions where ``target_mask`` is 1, 0 elsewhere.

    Args:
        input_ids, attention_mask: [batch, seq].
        target_mask: [batch, seq], 1 on the tokens to score (position 0 is never scored).
        temperature: logits are divided by it before the softmax.
        chunk: hidden rows projected to the vocabulary at once.
        hidden: precomputed :func:`hidden_states`, to share one body pass.

    Returns:
        (log-probs [batch, seq] float32, entropies [batch, seq] float32, zeros if not asked).
    """
    if hidden is None:
        hidden = hidden_states(model, input_ids, attention_mask)
    _, lm_head, softcap = causal_lm_parts(model)
    scored = target_mask[:, 1:].bool()  # token t is predicted by the hidden state at t - 1
    rows = hidden[:, :-1][scored]
    targets = input_ids[:, 1:][scored]
    lp, ent = rows_logprobs(rows, targets, lm_head, softcap, temperature, chunk, with_entropy)
    batch = input_ids.shape[0]
    first = hidden.new_zeros(batch, 1, dtype=torch.float32)
    out_lp = torch.cat([first, first.new_zeros(scored.shape).masked_scatter(scored, lp)], dim=1)
    out_ent = torch.cat([first, first.new_zeros(scored.shape).masked_scatter(scored, ent)], dim=1)
    return out_lp, out_ent


def reply_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, reply_mask: Tensor,
                   context_length: int, temperature: float = 1.0, chunk: int = 128,
                   with_entropy: bool = False, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Log-probs [batch, reply_len] of the reply tokens of left-padded prompt + reply sequences.

    ``input_ids[:, :context_length]`` is the (left-padded) prompt, the rest the reply;
    ``reply_mask`` [batch, reply_len] marks the reply tokens to score.
    """
    target_mask = torch.cat([torch.zeros_like(input_ids[:, :context_length]), reply_mask.long()], dim=1)
    lp, ent = token_logprobs(model, input_ids, attention_mask, target_mask, temperature, chunk, with_entropy, hidden)
    return lp[:, context_length:], ent[:, context_length:]
