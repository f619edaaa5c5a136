"""AdapterTable: which LoRA adapter versions an engine serves, and when one may be released.

Rules shared by both engines:

* An adapter is a peft LoRA folder (adapter_config.json + adapter_model.safetensors) whose
  rank fits the engine's `max_lora_rank` and whose shapes fit the base model; this is checked
  from the files' headers before the engine loads anything.
* A name means one set of weights for the engine's whole life. vLLM keys its prefix cache on
  the adapter name, so serving other weights under an old name could reuse stale KV blocks.
  Adding a name again is allowed only for the same, unchanged folder (e.g. a rollback).
* Every request holds its adapter while it runs; `remove_adapter` stops new requests at
  once and the engine frees the weights when the last running request ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from training.safetensors_header import safetensors_shapes

from .base import AdapterRef, EngineError
from .config import VLLM_LORA_RANKS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder holds, read from its files (no weights loaded)."""

    path: Path
    rank: int
    weight_shapes: dict[str, list[int]]  # from the safetensors header; empty for .bin files
    fingerprint: tuple[str, int, int]  # weights file, size, mtime: "the same weights"


def read_adapter(adapter: AdapterRef) -> AdapterInfo:
    """Check that `adapter.path` is a LoRA folder and read its rank; raise EngineError if not."""
    folder = Path(adapter.path).expanduser().resolve()
    if not folder.is_dir():
        raise EngineError(f"Adapter {adapter.name!r}: no folder at {folder}. Check the model version's adapter_path.")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise EngineError(
            f"Adapter {adapter.name!r}: {folder} is not a LoRA adapter folder (no {ADAPTER_CONFIG}). "
            "Save adapters with peft's `model.save_pretrained(folder)`."
        )
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise EngineError(
            f"Adapter {adapter.name!r}: {folder} has no {' or '.join(ADAPTER_WEIGHTS)}; the save did not finish."
        )
    try:
        config = json.loads(config_file.read_text())
        shapes = safetensors_shapes(weights) if weights.suffix == ".safetensors" else {}
    except ValueError as exc:  # JSON or safetensors: both say what is wrong
        raise EngineError(f"Adapter {adapter.name!r}: {folder} holds a damaged file ({exc}). Save it again.") from exc
    if config.get("peft_type") != "LORA":
        raise EngineError(
            f"Adapter {adapter.name!r} is a {config.get('peft_type')} adapter; the engines serve LoRA adapters only."
        )
    if config.get("use_dora"):
        raise EngineError(f"Adapter {adapter.name!r} uses DoRA, which vLLM cannot serve; train it with use_dora=False.")
    ranks = [int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    ranks += [shape[0] for key, shape in shapes.items() if key.endswith(".lora_A.weight")]
    stat = weights.stat()
    return AdapterInfo(folder, max(ranks), shapes, (str(weights), stat.st_size, stat.st_mtime_ns))


def check_rank_fits(adapter: AdapterRef, info: AdapterInfo, max_lora_rank: int) -> None:
    """Raise EngineError, saying what to do, when the adapter's rank exceeds `max_lora_rank`."""
    if info.rank <= max_lora_rank:
        return
    fits = next((r for r in VLLM_LORA_RANKS if r >= info.rank), None)
    restart = f"restart the engine with EngineConfig(max_lora_rank={fits})" if fits else "use a smaller rank"
    raise EngineError(
        f"Adapter {adapter.name!r} has LoRA rank {info.rank}, but this engine serves ranks up to "
        f"max_lora_rank={max_lora_rank}. Retrain it with r <= {max_lora_rank}, or {restart}."
    )


def check_fits_base(adapter: AdapterRef, info: AdapterInfo, base_shapes: dict[str, list[int]],
                    base_model: str) -> None:
    """Raise EngineError when a LoRA weight's shape does not fit the base model's layer.

    LoRA A is (rank, in_features) and B is (out_features, rank) of the layer `X.weight` it
    adapts. Layers the base model's files do not name are left to the engine.
    """
    for key, shape in info.weight_shapes.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        base = base_shapes.get(f"{module}.weight")
        if base is None or len(base) != 2 or len(shape) != 2 or kind not in ("A.weight", "B.weight"):
            continue
        expected, actual = (base[1], shape[1]) if kind == "A.weight" else (base[0], shape[0])
        if expected != actual:
            side = "inputs" if kind == "A.weight" else "outputs"
            raise EngineError(
                f"Adapter {adapter.name!r} does not fit {base_model}: {module} has {expected} {side}, the "
                f"adapter's lora_{kind} has {actual}. It was trained on another base model; serve it with that one."
            )


@dataclass
class ServedAdapter:
    """An adapter the engine has loaded: its name, folder, engine-wide id and running requests."""

    name: str
    info: AdapterInfo
    lora_id: int  # vLLM's lora_int_id; unique per name for the engine's life
    active_requests: int = 0
    removing: bool = False


ReleaseFn = Callable[[ServedAdapter], Awaitable[None]]


class AdapterTable:
    """The adapters one engine serves.

    Args:
        base_model_path: the base model folder; adapters must fit its layers' shapes.
        max_lora_rank: adapters with a larger rank are refused before loading.
        release: frees an adapter's weights in the engine; called once it is removed and idle.
    """

    def __init__(self, base_model_path: str | Path, max_lora_rank: int, release: ReleaseFn) -> None:
        self.base_model = str(base_model_path)
        self.max_lora_rank = max_lora_rank
        self._base_shapes = safetensors_shapes(Path(base_model_path))
        self._release = release
        self._served: dict[str, ServedAdapter] = {}
        self._ids: dict[str, int] = {}  # every name ever added -> its id (never reused for other weights)
        self._fingerprints: dict[str, tuple[str, int, int]] = {}
        self._loading: set[str] = set()
        self._next_id = 1

    @property
    def names(self) -> list[str]:
        """Adapters that new requests may use."""
        return [name for name, served in self._served.items() if not served.removing]

    def begin_add(self, adapter: AdapterRef) -> ServedAdapter | None:
        """Validate a new adapter and reserve its name; None if it is already served as it is.

        The caller loads the weights, then calls `finish_add` (or `abort_add` on failure).
        """
        if not adapter.name:
            raise EngineError("An adapter needs a non-empty name (its model-version name).")
        info = read_adapter(adapter)
        check_rank_fits(adapter, info, self.max_lora_rank)
        check_fits_base(adapter, info, self._base_shapes, self.base_model)
        known = self._fingerprints.get(adapter.name)
        if known is not None and known != info.fingerprint:
            raise EngineError(
                f"Adapter name {adapter.name!r} was already served with other weights ({known[0]}). "
                "vLLM caches prompts by adapter name, so each adapter version needs a new, unique name."
            )
        current = self._served.get(adapter.name)
        if current is not None and not current.removing:
            return None
        if adapter.name in self._loading or current is not None:
            raise EngineError(
                f"Adapter {adapter.name!r} is being loaded or released right now; try again in a moment."
            )
        lora_id = self._ids.get(adapter.name)
        if lora_id is None:
            lora_id, self._next_id = self._next_id, self._next_id + 1
        self._loading.add(adapter.name)
        return ServedAdapter(adapter.name, info, lora_id)

    def finish_add(self, served: ServedAdapter) -> None:
        """Make a loaded adapter available to requests."""
        self._loading.discard(served.name)
        self._ids[served.name] = served.lora_id
        self._fingerprints[served.name] = served.info.fingerprint
        self._served[served.name] = served

    def abort_add(self, served: ServedAdapter) -> None:
        """Forget an adapter whose loading failed; its name may be added again."""
        self._loading.discard(served.name)

    async def remove(self, name: str) -> None:
        """Stop new requests on `name`; release it now if idle, else when its last request ends."""
        served = self._served.get(name)
        if served is None:
            if name in self._ids:
                return  # already released
            raise EngineError(f"No adapter named {name!r} was added to this engine; nothing to remove.")
        if served.removing:
            return
        served.removing = True
        if served.active_requests == 0:
            await self._finish_release(served)

    @asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[ServedAdapter | None]:
        """Hold adapter `name` (None: the bare base model) for the duration of one request."""
        if name is None:
            yield None
            return
        served = self._served.get(name)
        if served is None or served.removing:
            state = "was removed" if name in self._ids else "was never added"
            raise EngineError(
                f"Adapter {name!r} {state}; add it with `add_adapter(AdapterRef(name, path))` first. "
                f"Servable now: {self.names or 'only the base model'}."
            )
        served.active_requests += 1
        try:
            yield served
        finally:
            served.active_requests -= 1
            if served.removing and served.active_requests == 0:
                # Shielded: a cancelled request must still free the weights it was the last to use.
                await asyncio.shield(self._finish_release(served))

    async def _finish_release(self, served: ServedAdapter) -> None:
        if self._served.get(served.name) is not served:
            return
        try:
            await self._release(served)
        finally:
            del self._served[served.name]
