"""The tensor names and shapes of a safetensors file, read from its header without torch.

`alignloop promote` checks an adapter beside a live server, and the serving engines check that an
adapter fits the base model before loading it; neither should import torch or read the weights.
``safetensors.safe_open`` (numpy framework, memory-mapped) reads the header and checks it as it does
when loading: known dtypes, each tensor's bytes = its shape x its dtype's size, the tensors back to
back up to the file's end (a file cut short or with trailing bytes is refused).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a .safetensors file or every one in a folder (a sharded model).

    Raises ValueError, naming the file, when one is missing or not a whole safetensors file.
    """
    shapes: dict[str, list[int]] = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        try:
            with safe_open(str(file), framework="numpy") as f:
                shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as exc:  # SafetensorError, OSError: the library's own message says which check failed
            raise ValueError(f"{file} is missing or not a whole safetensors file ({exc}).") from None
    return shapes
