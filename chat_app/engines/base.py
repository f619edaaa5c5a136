"""The engine contract: everything the chat app needs from an inference backend.

    stream(messages, adapter, sampling)        -> async iterator of ReplyChunk (text deltas, then a final chunk)
    generate(messages, n, adapter, sampling)   -> n alternative Completions
    generate_tokens(prompt_ids, n, ...)        -> the same, from prompt token ids already rendered (PPO rollouts)
    add_adapter(adapter) / remove_adapter(name)-> make a LoRA version servable / release it once idle
    check_health()                             -> raise EngineError once the engine can no longer serve
    close()

`adapter=None` means the bare base model. An adapter is named by its model-version name,
unique and never reused (vLLM keys its prefix cache on name and path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from training.sampling import APP_SAMPLING

if TYPE_CHECKING:
    from .chat_format import ChatFormat

Messages = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": ...}]


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter version: its unique name and its folder."""

    name: str
    path: Path


@dataclass
class SamplingConfig:
    """Sampling settings for one request (also stored with every reply)."""

    temperature: float = APP_SAMPLING.temperature
    top_p: float = APP_SAMPLING.top_p
    top_k: int = 0  # 0: off
    max_tokens: int = 256
    seed: int | None = None
    # > 1 discourages tokens already in the prompt or the reply (CTRL, Keskar et al. 2019: positive logits
    # divided by it, negative ones multiplied), the same rule in vLLM and transformers. 1.0: the model's
    # own distribution (what PPO's rollouts must sample from). Counting the prompt, it also discourages
    # the chat template's end-of-turn mark, so replies stop less often: the app uses frequency_penalty.
    repetition_penalty: float = 1.0
    # OpenAI's penalties, counted on the reply so far only (the prompt is not counted, so the end-of-turn
    # marks of the chat template are never discouraged): each logit minus frequency_penalty x the token's
    # count in the reply, minus presence_penalty if it occurs at all. Before the temperature, in both engines.
    # The app's default frequency_penalty is 0.5 (`serve --frequency-penalty`): a 270M model loops without it.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Min-p sampling (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"): tokens less likely than
    # min_p x the most likely token's probability are dropped, in both engines. Where a small model is sure
    # a turn ends (<end_of_turn> most likely) but spreads the rest over thousands of junk tokens, top-p still
    # keeps the junk (Gemma's <unusedN>, "model" in other scripts); min-p does not. The app's default is 0.1
    # (`serve --min-p`); 0 turns it off (PPO's rollouts must sample the model's own distribution).
    min_p: float = 0.0

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "seed": self.seed, "repetition_penalty": self.repetition_penalty,
                "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                "min_p": self.min_p}


@dataclass
class ReplyChunk:
    """One streamed step: the text added since the last chunk; the last chunk has `finished` set."""

    delta: str
    text: str  # everything so far
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / end of turn) | "length" (max_tokens) | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    """A finished reply."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class EngineError(RuntimeError):
    """The engine could not serve the request; the message says why and what to do."""


@runtime_checkable
class Engine(Protocol):
    """An inference backend. Implementations: `VLLMEngine`, `HFEngine`."""

    name: str
    base_model: str
    format: ChatFormat  # how conversations become prompt tokens (and how long they are)
    # Whether concurrent stream() calls decode together (vLLM's continuous batching). When not, K
    # replies to one prompt are faster as one generate(n=K) than as K streams waiting in turn.
    batches_streams: bool

    def stream(self, messages: Messages, *, adapter: str | None = None,
               sampling: SamplingConfig | None = None) -> AsyncIterator[ReplyChunk]: ...

    async def generate(self, messages: Messages, n: int = 1, *, adapter: str | None = None,
                       sampling: SamplingConfig | None = None) -> list[Completion]: ...

    async def generate_tokens(self, prompt_ids: list[int], n: int = 1, *, adapter: str | None = None,
                              sampling: SamplingConfig | None = None) -> list[Completion]: ...

    async def add_adapter(self, adapter: AdapterRef) -> None: ...

    async def remove_adapter(self, name: str) -> None: ...

    async def check_health(self) -> None: ...

    async def close(self) -> None: ...
