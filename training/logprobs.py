"""Log-probabilities of chosen tokens without materialising batch × seq × vocab logits.

Gemma 3 has a 262k vocabulary: the full logits of a batch of 16 × 512 tokens
would take 8.6 GB in float32. So we run the transformer body once to get hidden
states, keep only the rows whose next token we score (reply tokens), and
project them through the LM head a chunk at a time. With gradients on, each
chunk is checkpointed, so backward recomputes its logits instead of keeping them, and
:class:`SampledLogprobs` keeps only the chunk's log π for backward, its gradient written out.

The log-probs are those of the distribution the tokens were sampled from: the model's logits
(soft-capped), minus OpenAI's frequency penalty on the reply so far, divided by the temperature,
with min-p's cut (tokens below min_p x the top token's probability get none), renormalised. That is
how the chat app samples (training.sampling: the same order as transformers' generate and vLLM), so
PPO can train the policy users are served, not only its raw distribution.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


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


class SampledLogprobs(torch.autograd.Function):
    """log π(target) and the entropy H of softmax(z), z = logits / temperature with min-p's cut, keeping
    only log π [rows, vocab] for backward; the gradient is written out instead of taped:

        ∂ log π(t) / ∂z_j = 1[j = t] − π_j            (softmax cross-entropy)
        ∂ H / ∂z_j        = −π_j (log π_j + H)          (H = −Σ_j π_j log π_j)

    and ∂z/∂logits = 1/temperature (0 where min-p cut: π_j = 0 there, and the target is never cut).
    Taped, the same steps hold about nine vocabulary-wide tensors per row at once (the scaled and cut
    logits, the softmax, the entropy's products, and a gradient for each); here at most four.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, temperature: float, min_p: float,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        z = logits / temperature  # the sampling temperature, so log-probs match the sampled distribution
        if min_p > 0:  # min-p (Nguyen et al. 2024): p < min_p x p_max  <=>  z < max z + log(min_p)
            below = z < z.max(dim=-1, keepdim=True).values + math.log(min_p)
            # The scored token always stays: it was sampled, so it was above the cut where it was drawn; this
            # pass's logits differ from the sampler's in the last bits (another kernel, no KV cache), and a token
            # just under the cut here would get log 0: a KL of 10^38 nats, and NaN weights one update later. The
            # reference keeps it too, so its KL term stays finite (and large, if the reference finds it unlikely).
            below.scatter_(-1, targets.unsqueeze(-1), False)
            z.masked_fill_(below, torch.finfo(z.dtype).min)  # finite: the entropy stays a number
            del below
        logp = torch.log_softmax(z, dim=-1)
        del z
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if with_entropy else torch.zeros_like(picked)
        ctx.save_for_backward(logp, targets, entropy)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.set_materialize_grads(False)  # an output nothing differentiates (a logged entropy) arrives as None
        return picked, entropy

    @staticmethod
    def backward(ctx: Any, grad_picked: Tensor | None, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        logp, targets, entropy = ctx.saved_tensors
        probs = logp.exp()
        grad = torch.zeros_like(logp)
        if grad_picked is not None:
            torch.mul(probs, -grad_picked.unsqueeze(-1), out=grad)
            grad.scatter_add_(-1, targets.unsqueeze(-1), grad_picked.unsqueeze(-1))
        if grad_entropy is not None and ctx.with_entropy:  # without it, the entropy output is constant zeros
            term = logp + entropy.unsqueeze(-1)
            grad.sub_(term.mul_(probs).mul_(grad_entropy.unsqueeze(-1)))
            del term
        return grad.div_(ctx.temperature), None, None, None, None


def _chunk_logprobs(rows: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None,
                    temperature: float, with_entropy: bool, history: Tensor | None = None,
                    frequency_penalty: float = 0.0, min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    logits = lm_head(rows).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if history is not None and frequency_penalty:  # OpenAI's: logit - f x (count of the token in the reply so far)
        seen = history >= 0
        # In place: the projection does not keep its output for backward, and subtracting counts has gradient 1.
        logits.scatter_add_(1, history.clamp(min=0), seen.to(logits.dtype) * -frequency_penalty)
    return SampledLogprobs.apply(logits, targets, temperature, min_p, with_entropy)


def rows_logprobs(rows: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None = None,
                  temperature: float = 1.0, chunk: int = 128, with_entropy: bool = False,
                  history: Tensor | None = None, frequency_penalty: float = 0.0,
                  min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """log π(target | hidden row) for [N, hidden] rows, ``chunk`` rows at a time; also the entropy if asked.

    ``history`` [N, L]: the reply tokens before each row's target (-1: none), for the frequency penalty.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to compute log-probs, got {temperature}.")
    if not 0 <= min_p < 1 or frequency_penalty < 0:
        raise ValueError(f"min_p must be in [0, 1) and frequency_penalty >= 0, got {min_p} and {frequency_penalty}.")
    logprobs, entropies = [], []
    for start in range(0, rows.shape[0], chunk):
        past = history[start : start + chunk] if history is not None else None
        args = (rows[start : start + chunk], targets[start : start + chunk], lm_head, softcap, temperature, with_entropy,
                past, frequency_penalty, min_p)
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


def taped_rows_logprobs(rows: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None = None,
                        temperature: float = 1.0, chunk: int = 128, history: Tensor | None = None,
                        frequency_penalty: float = 0.0, min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """The reference for :func:`rows_logprobs`: the same log-probs and entropies through the plain steps,
    every one taped by autograd (each chunk checkpointed too). Tests check :class:`SampledLogprobs`'s
    written-out gradient against it and ``scripts/bench_training.py logprobs`` measures the two side by side;
    training never calls it (it keeps about nine vocabulary-wide tensors per row for backward)."""

    def one(x: Tensor, t: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = lm_head(x).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if past is not None and frequency_penalty:
            counts = torch.zeros_like(logits).scatter_add_(1, past.clamp(min=0), (past >= 0).to(logits.dtype))
            logits = logits - frequency_penalty * counts
        z = logits / temperature
        if min_p > 0:
            below = z < z.max(-1, keepdim=True).values + math.log(min_p)
        else:
            below = torch.zeros_like(z, dtype=torch.bool)
        below = below.scatter(-1, t.unsqueeze(-1), False)  # the sampled token keeps its own weight
        z = z.masked_fill(below, torch.finfo(z.dtype).min)
        logp = torch.log_softmax(z, -1)
        kept = logp.masked_fill(below, 0.0)  # π = 0 where cut: the same entropy, without 0 x 10^38 in backward
        return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(torch.softmax(z, -1) * kept).sum(-1)

    parts = [checkpoint(one, rows[i : i + chunk], targets[i : i + chunk],
                        history[i : i + chunk] if history is not None else None, use_reentrant=False)
             for i in range(0, rows.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
                   temperature: float = 1.0, chunk: int = 128, with_entropy: bool = False,
                   hidden: Tensor | None = None, history: Tensor | None = None, frequency_penalty: float = 0.0,
                   min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """log π(x_t | x_<t) at the positions where ``target_mask`` is 1, 0 elsewhere.

    Args:
        input_ids, attention_mask: [batch, seq].
        target_mask: [batch, seq], 1 on the tokens to score (position 0 is never scored).
        temperature: logits are divided by it before the softmax.
        chunk: hidden rows projected to the vocabulary at once.
        hidden: precomputed :func:`hidden_states`, to share one body pass.
        history, frequency_penalty, min_p: see :func:`rows_logprobs` (``history`` has one row per scored
            token, in the order of ``target_mask``'s ones).

    Returns:
        (log-probs [batch, seq] float32, entropies [batch, seq] float32, zeros if not asked).
    """
    if hidden is None:
        hidden = hidden_states(model, input_ids, attention_mask)
    _, lm_head, softcap = causal_lm_parts(model)
    scored = target_mask[:, 1:].bool()  # token t is predicted by the hidden state at t - 1
    rows = hidden[:, :-1][scored]
    targets = input_ids[:, 1:][scored]
    lp, ent = rows_logprobs(rows, targets, lm_head, softcap, temperature, chunk, with_entropy, history,
                            frequency_penalty, min_p)
    batch = input_ids.shape[0]
    first = hidden.new_zeros(batch, 1, dtype=torch.float32)
    out_lp = torch.cat([first, first.new_zeros(scored.shape).masked_scatter(scored, lp)], dim=1)
    out_ent = torch.cat([first, first.new_zeros(scored.shape).masked_scatter(scored, ent)], dim=1)
    return out_lp, out_ent


def reply_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, reply_mask: Tensor,
                   context_length: int, temperature: float = 1.0, chunk: int = 128,
                   with_entropy: bool = False, hidden: Tensor | None = None, frequency_penalty: float = 0.0,
                   min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """Log-probs [batch, reply_len] of the reply tokens of left-padded prompt + reply sequences, under the
    sampling that drew them (temperature, frequency penalty on the reply so far, min-p).

    ``input_ids[:, :context_length]`` is the (left-padded) prompt, the rest the reply;
    ``reply_mask`` [batch, reply_len] marks the reply tokens to score.
    """
    target_mask = torch.cat([torch.zeros_like(input_ids[:, :context_length]), reply_mask.long()], dim=1)
    history = reply_history(input_ids[:, context_length:], reply_mask) if frequency_penalty else None
    lp, ent = token_logprobs(model, input_ids, attention_mask, target_mask, temperature, chunk, with_entropy, hidden,
                             history, frequency_penalty, min_p)
    return lp[:, context_length:], ent[:, context_length:]


def reply_history(reply: Tensor, reply_mask: Tensor) -> Tensor:
    """For each scored reply token (``reply_mask``'s ones, row by row), the reply tokens before it:
    [scored, reply_len], -1 where there is none. Reply token j sees tokens 0..j-1."""
    length = reply.shape[1]
    before = torch.ones(length, length, dtype=torch.bool, device=reply.device).tril(-1)  # [j, i]: i < j
    past = reply.unsqueeze(1).expand(-1, length, -1).masked_fill(~before, -1)  # [batch, j, i]
    return past[reply_mask.bool()]
