"""PPO rollouts through a chat engine: training's ``Sampler`` contract on vLLM (or any `Engine`).

``training`` never imports the chat app; the chat app hands PPO a sampler factory instead:

    from chat_app.engines.rollout_sampler import vllm_sampler_factory
    train_ppo(cfg, sampler_factory=vllm_sampler_factory)        # what `alignloop train ppo` does

The engine gets the prompt token ids PPO fitted to its budget (``generate_tokens``), so the
sampler and every scorer see the same prompt; each iteration's policy adapter is registered
under a new name (vLLM keys its caches on names).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Sequence

from training.config import ConfigError, PPOConfig
from training.rollout import Sampler, SamplerContext, hf_sampler_factory, rollout_sampling
from training.sampling import ReplySampling

from .base import AdapterRef, Engine, Messages, SamplingConfig

log = logging.getLogger(__name__)


class EngineSampler:
    """Rollouts through an engine's ``generate_tokens(prompt_ids, 1, adapter=..., sampling=...)``.

    Args:
        engine: a started engine on the training run's base model; the sampler owns it and closes it.
        stop_ids: the ids that end a reply (the first is appended when an engine drops it).
        max_new_tokens: the longest reply.
        sampling: PPO's sampling settings (``training.rollout.rollout_sampling``; top-k off), the same ones
            its log-probs are computed under.
    """

    needs_adapter_folder = True

    def __init__(self, engine: Engine, stop_ids: list[int], max_new_tokens: int, sampling: ReplySampling):
        self.engine, self.stop_ids = engine, stop_ids
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.adapter: str | None = None
        self._loop = asyncio.new_event_loop()

    def set_policy(self, name: str, folder: Path | None) -> None:
        """Serve the adapter in ``folder`` as ``name`` and sample with it; release the previous one."""
        if folder is None:
            return
        previous = self.adapter
        self._loop.run_until_complete(self.engine.add_adapter(AdapterRef(name, Path(folder))))
        self.adapter = name
        if previous is not None:
            self._loop.run_until_complete(self.engine.remove_adapter(previous))

    def sample(self, prompt_ids: Sequence[list[int]], prompts: Sequence[Messages]) -> list[list[int]]:
        """One reply per prompt, generated from exactly ``prompt_ids`` (``prompts`` are not re-rendered)."""
        s = self.sampling
        sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p, top_k=0, max_tokens=self.max_new_tokens,
                                  frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                                  min_p=s.min_p)

        async def run_all() -> list[list]:
            return await asyncio.gather(*(self.engine.generate_tokens(list(ids), 1, adapter=self.adapter,
                                                                      sampling=sampling) for ids in prompt_ids))

        replies = []
        for (completion,) in self._loop.run_until_complete(run_all()):
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
                ids.append(self.stop_ids[0])  # some engines drop the stop token from the ids
            replies.append(ids)
        return replies

    def close(self) -> None:
        """Stop the engine and this sampler's event loop."""
        self._loop.run_until_complete(self.engine.close())
        self._loop.close()


def vllm_sampler_factory(cfg: PPOConfig, ctx: SamplerContext) -> Sampler:
    """training's ``SamplerFactory`` for vLLM: an :class:`EngineSampler` on a new vLLM engine.

    ``cfg.sampler='auto'`` takes vLLM only on a GPU where it imports (on CPU it would compete with
    training for the cores) and falls back to HF generate if the engine cannot start; 'vllm' insists.
    The engine's ``max_model_len`` is ``cfg.max_length``: PPO's prompts are fitted to
    ``max_length - max_new_tokens``, so prompt + reply always fit.
    """
    from training.base_models import prepare_model

    from . import EngineConfig, create_engine, vllm_available
    from .config import vllm_lora_rank

    if cfg.sampler == "hf" or (cfg.sampler == "auto" and (ctx.device.type != "cuda" or not vllm_available())):
        return hf_sampler_factory(cfg, ctx)
    try:
        engine_cfg = EngineConfig(max_model_len=cfg.max_length, max_lora_rank=vllm_lora_rank(cfg.lora.r), seed=cfg.seed)
        engine = create_engine("vllm", prepare_model(cfg.base_model), engine_cfg)
    except Exception as exc:  # noqa: BLE001 - fall back to HF generate on 'auto', but say why
        if cfg.sampler == "vllm":
            raise ConfigError(f"sampler='vllm' but the vLLM engine could not start ({exc}); use sampler='hf'.") from exc
        log.warning("vLLM engine unavailable (%s); sampling with HF generate.", exc)
        return hf_sampler_factory(cfg, ctx)
    return EngineSampler(engine, ctx.stop_ids, cfg.max_new_tokens, rollout_sampling(cfg))
