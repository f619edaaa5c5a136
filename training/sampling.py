"""How replies are drawn from a policy: greedy, or the way the chat app serves them.

A round's gates and ``scripts/bench_loop.py`` judge a candidate on replies drawn the way users get
them, not only greedily: a 270M model's greedy reply and its served reply (temperature, top-p,
min-p and a frequency penalty) differ, and so can which version is better. The rules are written
here once; the chat app's transformers engine applies the same :class:`ReplyPenalty`, and its
`serve` defaults are :data:`APP_SAMPLING`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ReplySampling:
    """How one evaluation draws replies: ``samples`` replies per prompt (one when greedy).

    temperature 0 is greedy (top-p, min-p and ``samples`` > 1 then mean nothing). The penalties are
    OpenAI's, on the reply so far (:class:`ReplyPenalty`). ``seed`` seeds torch before each version's
    replies, so every version draws from the same random stream (less noise in a paired comparison).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and 0 <= self.min_p <= 1 and self.samples >= 1):
            raise ValueError(f"{self}: need temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1 and samples >= 1.")
        if self.temperature == 0 and self.samples != 1:
            raise ValueError(f"greedy replies (temperature 0) are one per prompt, not samples={self.samples}; "
                             "set a temperature > 0 to draw several.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_samples(self, samples: int) -> ReplySampling:
        return dataclasses.replace(self, samples=samples)

    def generate_options(self, prompt_length: int) -> dict[str, Any]:
        """Keyword arguments of transformers' ``generate`` for prompts padded to ``prompt_length`` tokens: the
        penalty, then (sampling) :class:`ServedWarper`'s temperature, min-p and top-p, in vLLM's order;
        generate's own warpers are turned off."""
        processors: list[Any] = []
        if self.frequency_penalty or self.presence_penalty:
            processors.append(ReplyPenalty(prompt_length, self.frequency_penalty, self.presence_penalty))
        options: dict[str, Any] = {"do_sample": False}
        if not self.greedy:
            processors.append(ServedWarper(self.temperature, self.min_p, self.top_p))
            options = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        if processors:
            options["logits_processor"] = processors
        return options

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return (f"{self.samples} sampled per prompt (temperature {self.temperature:g}, top-p {self.top_p:g}, "
                f"min-p {self.min_p:g}, frequency penalty {self.frequency_penalty:g})")


GREEDY = ReplySampling()
# What `alignloop serve` gives a user who moves no slider: its --frequency-penalty and --min-p defaults, and
# the temperature and top-p of chat_app's SamplingConfig (both read them from here).
APP_SAMPLING = ReplySampling(temperature=0.8, top_p=0.95, min_p=0.1, frequency_penalty=0.5)


def evaluation_sampling(kind: str, samples: int) -> ReplySampling:
    """An evaluation's sampling by name: 'app' (:data:`APP_SAMPLING`, ``samples`` replies per prompt) or 'greedy'."""
    if kind == "greedy":
        return GREEDY
    if kind == "app":
        return APP_SAMPLING.with_samples(samples)
    raise ValueError(f"evaluation sampling {kind!r}: use 'app' or 'greedy'.")


class ReplyPenalty:
    """OpenAI's frequency and presence penalties on the tokens of the reply so far (not the prompt), as vLLM
    applies them: logit - frequency x count - presence x [count > 0]. A transformers logits processor."""

    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self._start, self._frequency, self._presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        reply = input_ids[:, self._start:]
        if reply.shape[1] == 0:
            return scores
        # Only the reply's own tokens change: one scatter, in place (generate hands each step a fresh copy of
        # the logits), no vocabulary-sized count tensor.
        scores = scores.scatter_add_(1, reply, torch.full(reply.shape, -self._frequency, dtype=scores.dtype,
                                                          device=scores.device))
        if self._presence:
            present = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, reply, True)
            scores = scores - self._presence * present.to(scores.dtype)
        return scores


class ServedWarper:
    """Temperature, then min-p, then top-p: the order of vLLM's sampler (penalties, temperature, min-p,
    top-k/top-p), as one transformers logits processor. (generate's own warpers apply top-p before min-p and
    sort all 262k logits every token; here top-p sorts only what min-p kept.) Like :class:`ReplyPenalty`, it
    changes the scores in place: generate hands each step a fresh copy of the logits."""

    def __init__(self, temperature: float, min_p: float = 0.0, top_p: float = 1.0) -> None:
        self.temperature, self.min_p, self.top_p = temperature, min_p, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        scores = scores.div_(self.temperature)  # in place: generate hands each step a fresh copy of the logits
        kept = scores.shape[-1]
        if self.min_p > 0:  # p < min_p x p_max  <=>  logit < max logit + log(min_p)
            below = scores < scores.max(dim=-1, keepdim=True).values + math.log(self.min_p)
            scores.masked_fill_(below, float("-inf"))
            kept -= int(below.sum(dim=-1).min())
        if self.top_p < 1:  # the fewest most likely tokens whose probability reaches top_p
            top, index = scores.topk(kept, dim=-1)
            probs = torch.softmax(top, dim=-1)
            beyond = probs.cumsum(dim=-1) - probs >= self.top_p  # the more likely tokens already reach top_p
            scores.fill_(float("-inf")).scatter_(-1, index, top.masked_fill(beyond, float("-inf")))
        return scores
