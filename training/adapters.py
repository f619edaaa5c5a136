"""One base model, several LoRA adapters and scalar heads: load, attach, switch, save.

Adapters are written with the files peft's ``save_pretrained`` writes
(``adapter_config.json`` + ``adapter_model.safetensors``), straight into a
fresh folder whatever the adapter's name inside the training model, so vLLM
and peft load them as they are. A folder is never overwritten: a served
adapter must not change under the server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.base_models import attention_implementation, load_model_and_tokenizer, prepare_model
from training.config import BaseSettings, ConfigError

logger = logging.getLogger(__name__)

HEAD_FILE = "scalar_head.safetensors"
HEAD_INFO_FILE = "scalar_head.json"


def resolve_device(device: str) -> torch.device:
    """'auto' → cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use --set device=cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' → bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"Unknown dtype {dtype!r}; use 'auto', 'float32' or 'bfloat16'.")
    return resolved


def load_base(cfg: BaseSettings) -> tuple[nn.Module, Any, torch.device]:
    """The frozen base model and tokenizer for a run (4-bit with bitsandbytes if ``load_in_4bit``)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder = prepare_model(cfg.base_model)
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise ConfigError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; drop it on CPU.")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
            from peft import prepare_model_for_kbit_training
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError("load_in_4bit needs bitsandbytes: pip install 'alignloop[gpu]'.") from exc
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype, device_map={"": device},
                                                     attn_implementation=attention_implementation(folder, device, cfg.attention))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model, tokenizer = load_model_and_tokenizer(folder, dtype=dtype, device=device, attention=cfg.attention)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        checkpoint_layers(model)
    return model, tokenizer, device


def checkpoint_layers(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them; return how many layers.

    A layer keeps only its input for backward (torch's non-reentrant checkpoint) whenever gradients are being
    taped, in train or eval mode alike (PPO scores and trains in eval mode: no dropout, the same function for
    old and new log-probs); without gradients (sampling, scoring) it runs as before. A layer already wrapped is
    left as it is, so calling this twice on one model checkpoints each layer once.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no decoder layers transformers can checkpoint; "
                          "set gradient_checkpointing=False.")
    for layer in layers:
        if getattr(layer, "_alignloop_checkpointed", False):
            continue
        forward = layer.forward

        def recomputed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = recomputed
        layer._alignloop_checkpointed = True
    return len(layers)


def fresh_dir(path: str | Path) -> Path:
    """Create ``path`` as a new, empty folder; refuse to reuse a non-empty one."""
    folder = Path(path).expanduser()
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} already exists and is not empty. Adapters go to a fresh folder each time "
            "(a served one must never change): pass another --output-dir."
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_adapter(model: nn.Module, adapter_name: str, folder: str | Path) -> Path:
    """Write one adapter of a peft model into ``folder`` as a standalone peft adapter."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")
    config = model.peft_config[adapter_name]
    config.inference_mode = True
    config.save_pretrained(str(folder))
    return folder


def attach_adapter(model: nn.Module, name: str, folder: str | Path | None, lora: Any, trainable: bool) -> nn.Module:
    """Add adapter ``name`` to ``model`` (a fresh LoRA if ``folder`` is None, else loaded from it).

    Returns the peft model (``model`` wrapped on first use).
    """
    from peft import PeftModel, get_peft_model

    if folder is not None and not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"{folder} is not a LoRA adapter folder (no adapter_config.json).")
    if not isinstance(model, PeftModel):
        if folder is None:
            model = get_peft_model(model, lora.to_peft(), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=trainable)
    elif folder is None:
        model.add_adapter(name, lora.to_peft())
    else:
        model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
    for param_name, p in model.named_parameters():
        if f".{name}." in param_name:
            p.requires_grad_(trainable)
    return model


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The LoRA parameters of adapter ``name``."""
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]


class ScalarHead(nn.Module):
    """A linear map from the last hidden state to one number (a reward or a value), kept in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def save_head(head: ScalarHead, folder: str | Path, info: dict[str, Any]) -> None:
    """Write the head's weights and ``info`` (shift, std, metrics) beside an adapter."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, folder / HEAD_FILE)
    info = {"hidden_size": head.linear.in_features, **info}
    (folder / HEAD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_head(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ScalarHead, dict[str, Any]]:
    """The scalar head and its info saved by :func:`save_head`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_FILE).is_file():
        raise ConfigError(f"{folder} has no {HEAD_FILE}: it is not a reward adapter from `alignloop train rm`.")
    info = json.loads((folder / HEAD_INFO_FILE).read_text())
    head = ScalarHead(info["hidden_size"])
    head.load_state_dict(load_file(folder / HEAD_FILE))
    return head.to(device), info


def use_adapter(model: nn.Module, name: str | None, trainable: set[str]) -> None:
    """Make ``name`` the active adapter without changing which adapters train.

    peft's ``set_adapter`` marks the active adapter trainable and the others
    frozen; PPO switches adapters within one step, so we restore the flags.
    ``name=None`` is not handled here: use ``model.disable_adapter()``.
    """
    model.set_adapter(name)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(any(f".{t}." in n for t in trainable))
