"""Helpers for the engine contract tests: one event loop per module, LoRA adapters for tiny models."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from chat_app.engines import ReplyChunk

T = TypeVar("T")

# The projections vLLM can serve LoRA on for Gemma 3 (and what peft targets by default for it).
GEMMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class EventLoopThread:
    """An asyncio event loop running in a background thread.

    Engines bind to the loop they first serve on (vLLM's output handler is a task on it), so a
    module-scoped engine needs one loop that outlives each test; tests submit coroutines here.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        """Run `coro` on the loop and return its result (fail after `timeout` seconds)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


async def collect(chunks: AsyncIterator[ReplyChunk]) -> list[ReplyChunk]:
    """Every chunk of a streamed reply."""
    return [chunk async for chunk in chunks]


def make_lora_adapter(base_model_path: Path, folder: Path, *, seed: int, rank: int = 8,
                      scale: float = 0.5) -> Path:
    """Save a random LoRA adapter for `base_model_path` to `folder` and return it.

    peft starts LoRA B at zero (an untrained adapter changes nothing), so B gets random
    values here: the adapter visibly changes greedy output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=GEMMA_LORA_TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(folder)
    return folder
