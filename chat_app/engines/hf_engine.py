"""HFEngine: the transformers + peft fallback, for machines without vLLM.

One base model carries every adapter version (transformers' peft integration: `load_adapter`
per version, `set_adapter` per request, `disable_adapters` for the bare base). The model is
owned by a single worker thread: generation, adapter loading and release run there one job
at a time, in order, so a request never sees another request's adapter and the asyncio event
loop never waits on the model. Tokens reach the loop through a streamer as they are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.sampling import ReplySampling

from .adapters import AdapterTable, ServedAdapter
from .base import AdapterRef, Completion, EngineError, Messages, ReplyChunk, SamplingConfig
from .chat_format import ChatFormat, read_stop_token_ids
from .config import EngineConfig, check_sampling

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DONE = object()  # end of a streamed generation, put on the queue after the last token


class HFEngine:
    """An `Engine` on transformers + peft.

    Args:
        base_model_path: a prepared model folder (see `training.base_models.prepare_model`).
        config: engine settings; `device`, `dtype`, `max_model_len` and `max_lora_rank` apply.
    """

    name = "hf"
    batches_streams = False  # one worker thread runs one generation at a time

    def __init__(self, base_model_path: str | Path, config: EngineConfig | None = None) -> None:
        import torch

        from training.base_models import load_model_and_tokenizer

        self.config = config or EngineConfig()
        self.base_model = str(base_model_path)
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model_and_tokenizer(base_model_path, dtype=self.config.dtype, device=device)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions and self.config.max_model_len > max_positions:
            raise EngineError(
                f"max_model_len={self.config.max_model_len} exceeds what {self.base_model} supports "
                f"({max_positions} positions); lower EngineConfig.max_model_len."
            )
        self._model = model
        self._device = torch.device(device)
        stops = read_stop_token_ids(Path(base_model_path), tokenizer)
        self.format = ChatFormat(tokenizer, stops, self.config.max_model_len)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.format.stop_token_ids[0]
        self._adapters = AdapterTable(base_model_path, self.config.max_lora_rank, release=self._release)
        self._peft_loaded: set[str] = set()  # touched only on the worker thread
        # torch's thread count is per thread (OpenMP), so this limits only the engine's worker.
        threads = self.config.cpu_threads
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine",
                                          initializer=torch.set_num_threads if threads else None,
                                          initargs=(threads,) if threads else ())

    @property
    def adapters(self) -> list[str]:
        """Adapter names new requests may use."""
        return self._adapters.names

    # -- the Engine contract -----------------------------------------------------------
    async def stream(self, messages: Messages, *, adapter: str | None = None,
                     sampling: SamplingConfig | None = None) -> AsyncIterator[ReplyChunk]:
        """Stream one reply: chunks with the new text, then a final chunk with the finish reason."""
        sampling = sampling or SamplingConfig()
        check_sampling(sampling)
        prompt = self.format.render(messages)
        budget = self.format.reply_budget(len(prompt), sampling.max_tokens)
        async with self._adapters.use(adapter) as served:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            cancel = threading.Event()
            streamer = _TokenStreamer(loop, queue)
            job = loop.run_in_executor(self._worker, self._generate_blocking,
                                       prompt, 1, served, sampling, budget, streamer, cancel)
            job.add_done_callback(lambda done: _end_of_stream(done, queue))
            reply = _ReplyDecoder(self.format.tokenizer, set(self.format.stop_token_ids))
            try:
                while (tokens := await queue.get()) is not _DONE:
                    delta = reply.add(tokens)
                    if delta:
                        yield ReplyChunk(delta, reply.text, prompt_tokens=len(prompt),
                                         completion_tokens=len(reply.token_ids))
                await _engine_errors(job, self.base_model)
                delta = reply.finish()
                yield ReplyChunk(delta, reply.text, finished=True, finish_reason=reply.finish_reason(budget),
                                 prompt_tokens=len(prompt), completion_tokens=len(reply.token_ids))
            finally:
                cancel.set()  # the reader left early (or is done): stop decoding for it

    async def generate(self, messages: Messages, n: int = 1, *, adapter: str | None = None,
                       sampling: SamplingConfig | None = None) -> list[Completion]:
        """`n` alternative replies to the same conversation, decoded together as one batch."""
        return await self.generate_tokens(self.format.render(messages), n, adapter=adapter, sampling=sampling)

    async def generate_tokens(self, prompt_ids: list[int], n: int = 1, *, adapter: str | None = None,
                              sampling: SamplingConfig | None = None) -> list[Completion]:
        """`n` alternative replies to a prompt given as token ids (already rendered with the chat template)."""
        if n < 1:
            raise EngineError(f"n={n}; ask for at least one reply.")
        sampling = sampling or SamplingConfig()
        check_sampling(sampling)
        prompt = self.format.check_prompt(list(prompt_ids))
        budget = self.format.reply_budget(len(prompt), sampling.max_tokens)
        samples = 1 if sampling.temperature == 0 else n  # greedy alternatives are identical: decode one
        async with self._adapters.use(adapter) as served:
            cancel = threading.Event()
            job = asyncio.get_running_loop().run_in_executor(
                self._worker, self._generate_blocking, prompt, samples, served, sampling, budget, None, cancel)
            try:
                rows = await _engine_errors(job, self.base_model)
            except asyncio.CancelledError:
                cancel.set()
                raise
        completions = []
        for row in rows * (n // samples):
            reply = _ReplyDecoder(self.format.tokenizer, set(self.format.stop_token_ids))
            reply.add(row)
            reply.finish()
            completions.append(Completion(reply.text, reply.finish_reason(budget), len(prompt),
                                          len(reply.token_ids), reply.token_ids))
        return completions

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load an adapter version next to the others; requests may name it once this returns."""
        served = self._adapters.begin_add(adapter)
        if served is None:
            return  # already served, same folder
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._load_blocking, served)
        except BaseException as exc:
            self._adapters.abort_add(served)
            self._worker.submit(self._unload_blocking, _peft_name(served))  # whatever got loaded
            if isinstance(exc, EngineError) or not isinstance(exc, Exception):
                raise
            raise EngineError(
                f"Adapter {adapter.name!r} ({adapter.path}) could not be loaded onto {self.base_model}: {exc}. "
                "Was it trained on this base model?"
            ) from exc
        self._adapters.finish_add(served)

    async def remove_adapter(self, name: str) -> None:
        """Stop serving `name`; its weights are freed once no running request uses it."""
        await self._adapters.remove(name)

    async def check_health(self) -> None:
        """Raise EngineError once the engine was closed (the model runs in this process otherwise)."""
        if self._model is None:
            raise EngineError("the transformers engine was closed; restart the server.")

    async def close(self) -> None:
        """Finish queued work and free the model."""
        await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown)
        self._model = None

    # -- on the worker thread ------------------------------------------------------------
    def _generate_blocking(self, prompt: list[int], n: int, served: ServedAdapter | None,
                           sampling: SamplingConfig, budget: int, streamer: _TokenStreamer | None,
                           cancel: threading.Event) -> list[list[int]]:
        import torch
        from transformers import StoppingCriteriaList

        if cancel.is_set():  # the request went away while it waited for its turn
            return [[] for _ in range(n)]
        self._select_adapter(served)
        input_ids = torch.tensor([prompt] * n, dtype=torch.long, device=self._device)
        # The penalties, then temperature, min-p and top-p in vLLM's order (training.sampling, the one rule);
        # generate's own top-k, after them, and its repetition penalty, before them.
        options = ReplySampling(temperature=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p,
                                frequency_penalty=sampling.frequency_penalty,
                                presence_penalty=sampling.presence_penalty).generate_options(len(prompt))
        if sampling.temperature > 0:
            options["top_k"] = sampling.top_k
        if sampling.repetition_penalty != 1.0:
            options["repetition_penalty"] = sampling.repetition_penalty
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            output = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=budget,
                eos_token_id=self.format.stop_token_ids,
                pad_token_id=self._pad_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]),
                **options,
            )
        return output[:, len(prompt):].tolist()

    def _select_adapter(self, served: ServedAdapter | None) -> None:
        if served is None:
            if self._peft_loaded:
                self._model.disable_adapters()
            return
        self._model.enable_adapters()
        self._model.set_adapter(_peft_name(served))

    def _load_blocking(self, served: ServedAdapter) -> None:
        name = _peft_name(served)
        with _quiet_logger("transformers.integrations.peft"):
            # Its load report lists the other adapters' weights as missing; we check our own below.
            info = self._model.load_adapter(str(served.info.path), adapter_name=name, hotswap=False)
        self._peft_loaded.add(name)
        ours = f".{name}."
        missing = sorted(k for k in getattr(info, "missing_keys", None) or [] if ours in k)
        mismatched = sorted(k[0] for k in getattr(info, "mismatched_keys", None) or [] if ours in k[0])
        if missing or mismatched:
            self._unload_blocking(name)
            raise EngineError(
                f"Adapter {served.name!r} does not match {self.base_model}: "
                f"{len(missing)} LoRA weights missing, {len(mismatched)} with other shapes "
                f"(e.g. {(missing + mismatched)[0]}). Was it trained on this base model?"
            )

    def _unload_blocking(self, name: str) -> None:
        if name in (getattr(self._model, "peft_config", None) or {}):
            self._model.delete_adapter(name)
        self._peft_loaded.discard(name)

    async def _release(self, served: ServedAdapter) -> None:
        # Queued behind any generation still using it, on the same worker thread.
        await asyncio.get_running_loop().run_in_executor(self._worker, self._unload_blocking, _peft_name(served))


def _peft_name(served: ServedAdapter) -> str:
    # Version names may hold dots (not allowed in module names); the trailing "_" keeps
    # "v1_" from matching "v12_" when transformers filters state-dict keys by name.
    return f"alignloop_v{served.lora_id}_"


def _end_of_stream(job: asyncio.Future, queue: asyncio.Queue[Any]) -> None:
    """Done-callback of a streamed generation: wake the reader (also when generate() raised)."""
    if not job.cancelled():
        job.exception()  # retrieved here too, so an abandoned stream logs no "never retrieved"
    queue.put_nowait(_DONE)


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence one logger's warnings for a moment."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _engine_errors(job: asyncio.Future, base_model: str) -> Any:
    """Await a worker job, turning unexpected errors into EngineError."""
    try:
        return await job
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"Generation on {base_model} failed: {type(exc).__name__}: {exc}") from exc


class _TokenStreamer:
    """A transformers streamer that hands each step's new token ids to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self._loop = loop
        self._queue = queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first sends the prompt
            self._prompt_seen = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        pass  # the job's completion ends the stream (also when generate() raises)


class _StopWhenSet:
    """Stopping criterion: end generation once the request is cancelled."""

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        return torch.full((input_ids.shape[0],), self._cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class _ReplyDecoder:
    """Turns a reply's token ids into text as they arrive.

    Tokens after the first stop token (batch padding) are dropped; the stop token counts as a
    completion token, as in vLLM, but is not part of the text. Text that ends inside a UTF-8
    character (byte-level tokens) is held back until the character is complete.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._stop_ids = stop_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text they complete (maybe "")."""
        for token in tokens:
            if self.stopped:
                break
            self.token_ids.append(token)
            self.stopped = token in self._stop_ids
        full = self._decode()
        if full.endswith("\ufffd"):
            return ""
        return self._advance(full)

    def finish(self) -> str:
        """The text still held back, now that the reply is complete."""
        full = self._decode()
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return delta

    def finish_reason(self, budget: int) -> str:
        if self.stopped:
            return "stop"
        return "length" if len(self.token_ids) >= budget else "abort"

    def _decode(self) -> str:
        ids = self.token_ids[:-1] if self.stopped else self.token_ids
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, full: str) -> str:
        if not full.startswith(self.text):
            return ""  # decoding re-read earlier bytes; the final text corrects it
        delta, self.text = full[len(self.text):], full
        return delta
