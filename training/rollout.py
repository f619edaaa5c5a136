"""Sampling replies for PPO rollouts: the :class:`Sampler` contract and HF ``generate``.

A sampler turns prompt token ids into reply token ids. Only the tokens come
back: PPO recomputes every log-prob with the training model (with the sampling
temperature), so a sampler's own numbers never enter the loss. The prompt ids it
gets are the ones every scorer sees (``chat_data.encode_prompt_fitted``): a sampler
must generate from exactly those ids, never re-render the messages.

* :class:`HFSampler` generates with the policy adapter of the training model.
* Other samplers come from the caller as a :data:`SamplerFactory`: ``training``
  never imports ``chat_app`` (imports flow one way). The chat app's vLLM sampler is
  ``chat_app.engines.rollout_sampler.vllm_sampler_factory``, which
  ``alignloop train ppo --sampler vllm`` passes to ``train_ppo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch
from torch import nn

from training.adapters import use_adapter
from training.chat_data import Messages, left_pad
from training.sampling import ReplySampling

if TYPE_CHECKING:
    from training.config import PPOConfig


class Sampler(Protocol):
    """Reply token ids for prompts, sampled with the current policy.

    ``needs_adapter_folder``: True when the sampler runs the policy elsewhere (an engine), so
    PPO saves each iteration's policy adapter to a new folder and calls ``set_policy`` with it.
    """

    needs_adapter_folder: bool

    def sample(self, prompt_ids: Sequence[list[int]], prompts: Sequence[Messages]) -> list[list[int]]:
        """One reply's token ids per prompt, generated from ``prompt_ids`` (``prompts``: the same, as messages)."""
        ...

    def set_policy(self, name: str, folder: Path | None) -> None:
        """Sample with the policy adapter saved in ``folder`` under the new, unique ``name`` from now on."""
        ...

    def close(self) -> None:
        """Release what the sampler started (an engine process); called once, after training."""
        ...


@dataclass
class SamplerContext:
    """What PPO hands a sampler factory besides its config: the training model (with its
    ``policy`` adapter), tokenizer, reply stop ids, pad id and device. An engine sampler
    typically needs only ``tokenizer`` and ``stop_ids``; :class:`HFSampler` uses all of it."""

    model: nn.Module
    tokenizer: Any
    trainable: set[str]
    stop_ids: list[int]
    pad_id: int
    device: torch.device


# Builds the rollout sampler of a PPO run from its config and the training side's context.
SamplerFactory = Callable[["PPOConfig", SamplerContext], Sampler]


class HFSampler:
    """``model.generate`` with the policy adapter active, left-padded prompts, sampled as PPO's config says
    (:func:`rollout_sampling`: temperature, top-p, the app's frequency penalty and min-p when set)."""

    needs_adapter_folder = False

    def __init__(self, model: nn.Module, tokenizer: Any, trainable: set[str], stop_ids: list[int], pad_id: int,
                 max_new_tokens: int, sampling: ReplySampling, device: torch.device):
        self.model, self.tokenizer, self.trainable = model, tokenizer, trainable
        self.stop_ids, self.pad_id, self.device = stop_ids, pad_id, device
        self.max_new_tokens, self.sampling = max_new_tokens, sampling

    def set_policy(self, name: str, folder: Path | None) -> None:
        """Nothing to do: the training model's policy adapter is always the current one."""

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[list[int]], prompts: Sequence[Messages]) -> list[list[int]]:
        use_adapter(self.model, "policy", self.trainable)
        ids, mask = left_pad(prompt_ids, self.pad_id)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            **self.sampling.generate_options(ids.shape[1]),
        )
        return [row.tolist() for row in out[:, ids.shape[1] :].cpu()]

    def close(self) -> None:
        """Nothing to release: the model belongs to the trainer."""


def hf_sampler_factory(cfg: PPOConfig, ctx: SamplerContext) -> HFSampler:
    """A :data:`SamplerFactory` for :class:`HFSampler` (``generate`` on the training model)."""
    return HFSampler(ctx.model, ctx.tokenizer, ctx.trainable, ctx.stop_ids, ctx.pad_id, cfg.max_new_tokens,
                     rollout_sampling(cfg), ctx.device)


def rollout_sampling(cfg: PPOConfig) -> ReplySampling:
    """How PPO samples its rollouts: its temperature, top-p, frequency penalty and min-p (the same settings
    every log-prob is computed under)."""
    return ReplySampling(temperature=cfg.temperature, top_p=cfg.top_p, min_p=cfg.min_p,
                         frequency_penalty=cfg.frequency_penalty)
