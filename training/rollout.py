"""Sampling replies for PPO rollouts: HF ``generate`` on the training model, or a chat engine.

A sampler turns prompt token ids into reply token ids. Only the tokens come
back: PPO recomputes every log-prob with the training model (with the sampling
temperature), so a sampler's own numbers never enter the loss.

* :class:`HFSampler` generates with the policy adapter of the training model.
* :class:`EngineSampler` uses a chat-app engine (vLLM): each iteration's
  policy adapter is saved to a new folder and registered under a new name.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from training.adapters import use_adapter
from training.chat_data import Messages, left_pad


class Sampler(Protocol):
    """Reply token ids for prompts (token ids and the same prompts as messages)."""

    def sample(self, prompt_ids: Sequence[list[int]], prompts: Sequence[Messages]) -> list[list[int]]: ...

    def set_policy(self, name: str, folder: Path | None) -> None: ...


class HFSampler:
    """``model.generate`` with the policy adapter active, left-padded prompts, plain sampling."""

    needs_adapter_folder = False

    def __init__(self, model: nn.Module, tokenizer: Any, trainable: set[str], stop_ids: list[int], pad_id: int,
                 max_new_tokens: int, temperature: float, top_p: float, device: torch.device):
        self.model, self.tokenizer, self.trainable = model, tokenizer, trainable
        self.stop_ids, self.pad_id, self.device = stop_ids, pad_id, device
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def set_policy(self, name: str, folder: Path | None) -> None:
        """Nothing to do: the training model's policy adapter is always the current one."""

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[list[int]], prompts: Sequence[Messages]) -> list[list[int]]:
        use_adapter(self.model, "policy", self.trainable)
        ids, mask = left_pad(prompt_ids, self.pad_id)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        return [row.tolist() for row in out[:, ids.shape[1] :].cpu()]


class EngineSampler:
    """Rollouts through a chat-app engine (``generate(messages, n, adapter=..., sampling=...)``).

    The engine applies the chat template itself, as it does for users; the
    policy adapter is registered under a fresh name every iteration.
    """

    needs_adapter_folder = True

    def __init__(self, engine: Any, stop_ids: list[int], max_new_tokens: int, temperature: float, top_p: float):
        self.engine, self.stop_ids = engine, stop_ids
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.adapter: str | None = None
        self._loop = asyncio.new_event_loop()

    def set_policy(self, name: str, folder: Path | None) -> None:
        from chat_app.engines.base import AdapterRef

        if folder is None:
            return
        previous = self.adapter
        self._loop.run_until_complete(self.engine.add_adapter(AdapterRef(name, Path(folder))))
        self.adapter = name
        if previous is not None:
            self._loop.run_until_complete(self.engine.remove_adapter(previous))

    def sample(self, prompt_ids: Sequence[list[int]], prompts: Sequence[Messages]) -> list[list[int]]:
        from chat_app.engines.base import SamplingConfig

        sampling = SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=0, max_tokens=self.max_new_tokens)

        async def run_all() -> list[Any]:
            return await asyncio.gather(*(self.engine.generate(m, 1, adapter=self.adapter, sampling=sampling) for m in prompts))

        replies = []
        for (completion,) in self._loop.run_until_complete(run_all()):
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
                ids.append(self.stop_ids[0])  # some engines drop the stop token from the ids
            replies.append(ids)
        return replies

    def close(self) -> None:
        self._loop.run_until_complete(self.engine.close())
        self._loop.close()
