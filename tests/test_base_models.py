"""Tests for training.base_models: the tiny model, the chat template, preparing and caching.

All but the last test use the tiny random model and take seconds; the last
(marked slow) converts or reuses the real embedded Gemma 3 270M.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from typer.testing import CliRunner

from training import base_models
from training.base_models import (
    END_OF_TURN,
    GEMMA_CHAT_TEMPLATE,
    MANIFEST_NAME,
    START_OF_TURN,
    ModelPreparationError,
    build_tiny_model,
    default_cache_dir,
    list_models,
    load_model_and_tokenizer,
    prepare_model,
    read_manifest,
    resolve_model,
)
from training.cli import models_app

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unprepared_copy(tiny_model_path: Path, dest: Path, *, keep_template: bool = False) -> Path:
    """A plain Hugging Face folder: the tiny model without manifest (and without chat template)."""
    shutil.copytree(tiny_model_path, dest)
    (dest / MANIFEST_NAME).unlink()
    if not keep_template:
        (dest / "chat_template.jinja").unlink()
    return dest


# --------------------------------------------------------------------------- #
# The tiny model
# --------------------------------------------------------------------------- #


def test_tiny_model_is_a_gemma3_text_model_vllm_can_read(tiny_model_path: Path) -> None:
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert config["head_dim"] == 64
    assert config["tie_word_embeddings"] is True
    assert read_manifest(tiny_model_path) is not None
    # transformers writes weights through a 0600 temp file; prepared folders get normal modes
    weights_mode = (tiny_model_path / "model.safetensors").stat().st_mode
    assert weights_mode == (tiny_model_path / "config.json").stat().st_mode


def test_tiny_model_is_deterministic(tiny_model_path: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_model_path / name), name


def test_tiny_model_loads_with_auto_classes(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id  # <bos> is prepended, as in Gemma
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert len(tokenizer) == model.config.vocab_size


def test_load_model_and_tokenizer_returns_eval_model(tiny_model_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_path, dtype="bfloat16")
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert tokenizer.chat_template == GEMMA_CHAT_TEMPLATE


def test_load_model_and_tokenizer_explains_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="alignloop models prepare"):
        load_model_and_tokenizer(tmp_path / "nope")


# --------------------------------------------------------------------------- #
# Chat template and end of turn
# --------------------------------------------------------------------------- #


def test_turn_markers_are_single_special_tokens(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    for token in (START_OF_TURN, END_OF_TURN):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tokenizer.all_special_ids, token


def test_chat_template_renders_gemma_turn_format(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    without_prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert without_prompt == text.removesuffix("<start_of_turn>model\n")


def test_system_prompt_folds_into_first_user_turn(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chat_template_accepts_text_parts(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    text = tokenizer.apply_chat_template(parts, tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi there<end_of_turn>\n"


def test_chat_template_rejects_roles_out_of_order(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi"}], tokenize=False)


def test_chat_template_marks_assistant_tokens(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    encoded = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    reply = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(reply) == "Hello!<end_of_turn>"


class _ForceTokenAt(LogitsProcessor):
    """Forbid the stop tokens until step ``step``, then force ``token_id``."""

    def __init__(self, token_id: int, step: int, prompt_len: int, stop_ids: list[int]) -> None:
        self.token_id, self.step, self.prompt_len, self.stop_ids = token_id, step, prompt_len, stop_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token_id] = 0.0
        else:
            scores[:, self.stop_ids] = -float("inf")
        return scores


def test_generation_stops_at_end_of_turn(tiny_model_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_path)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, end_of_turn]
    inputs = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    force = _ForceTokenAt(end_of_turn, step=3, prompt_len=prompt_len, stop_ids=model.generation_config.eos_token_id)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, logits_processor=LogitsProcessorList([force]))
    new_tokens = out[0, prompt_len:].tolist()
    assert len(new_tokens) == 4 and new_tokens[-1] == end_of_turn


# --------------------------------------------------------------------------- #
# Names, the cache and preparing
# --------------------------------------------------------------------------- #


def test_resolve_model_names(tmp_path: Path) -> None:
    assert resolve_model("default").kind == "embedded"
    assert resolve_model("gemma-3-270m").name == "gemma-3-270m"
    hub = resolve_model("google/gemma-3-270m-it")
    assert (hub.kind, hub.name) == ("hub", "google--gemma-3-270m-it")
    assert resolve_model(tmp_path).kind == "folder"
    with pytest.raises(ModelPreparationError, match="No model folder"):
        resolve_model(str(tmp_path / "missing"))


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALIGNLOOP_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("ALIGNLOOP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "alignloop" / "models"


def test_prepared_folder_is_returned_as_is(tiny_model_path: Path, tmp_path: Path) -> None:
    assert prepare_model(tiny_model_path, tmp_path / "cache") == tiny_model_path.resolve()
    assert not (tmp_path / "cache").exists()


def test_prepare_local_folder_adds_template_and_is_cached(tiny_model_path: Path, tmp_path: Path) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "my-model")
    cache = tmp_path / "cache"

    prepared = prepare_model(source, cache)

    assert prepared == cache / "my-model"
    manifest = read_manifest(prepared)
    assert manifest is not None and manifest.source == str(source.resolve()) and manifest.chat_template_added
    assert AutoTokenizer.from_pretrained(prepared).chat_template == GEMMA_CHAT_TEMPLATE
    assert json.loads((prepared / "generation_config.json").read_text())["eos_token_id"] == [1, 5]
    mtime = (prepared / MANIFEST_NAME).stat().st_mtime_ns
    assert prepare_model(source, cache) == prepared
    assert (prepared / MANIFEST_NAME).stat().st_mtime_ns == mtime  # cached, not converted again
    assert [m.name for m in list_models(cache)] == ["my-model"]


def test_prepare_keeps_an_existing_chat_template(tiny_model_path: Path, tmp_path: Path) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "templated", keep_template=True)
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    prepared = prepare_model(source, tmp_path / "cache")
    assert "{% for m in messages %}" in AutoTokenizer.from_pretrained(prepared).chat_template
    assert read_manifest(prepared).chat_template_added is False


def test_prepare_refuses_a_different_source_under_the_same_name(tiny_model_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    prepare_model(_unprepared_copy(tiny_model_path, tmp_path / "a" / "model"), cache)
    with pytest.raises(ModelPreparationError, match="already holds a model prepared from"):
        prepare_model(_unprepared_copy(tiny_model_path, tmp_path / "b" / "model"), cache)


def test_prepare_never_overwrites_a_folder_it_did_not_make(tiny_model_path: Path, tmp_path: Path) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "my-model")
    foreign = tmp_path / "cache" / "my-model"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ModelPreparationError, match="not prepared by alignloop"):
        prepare_model(source, tmp_path / "cache")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_force_replaces_a_prepared_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "my-model")
    prepared = prepare_model(source, tmp_path / "cache")
    first = read_manifest(prepared).created_at, (prepared / MANIFEST_NAME).stat().st_mtime_ns
    assert prepare_model(source, tmp_path / "cache", force=True) == prepared
    assert (read_manifest(prepared).created_at, (prepared / MANIFEST_NAME).stat().st_mtime_ns) != first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["my-model"]


def test_interrupted_preparation_leaves_nothing_that_looks_done(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "my-model")
    cache = tmp_path / "cache"

    def crash_halfway(model_source: base_models.ModelSource, staging: Path) -> None:
        (staging / "config.json").write_text("{}")  # a half-written folder
        raise KeyboardInterrupt

    monkeypatch.setattr(base_models, "_copy_hf_model", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(source, cache)
    assert not (cache / "my-model").exists()
    assert list(cache.iterdir()) == []  # the staging folder is gone too
    monkeypatch.undo()

    assert base_models.is_prepared(prepare_model(source, cache))


def test_staging_folders_of_dead_runs_are_cleaned_up(tiny_model_path: Path, tmp_path: Path) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "my-model")
    cache = tmp_path / "cache"
    killed = cache / ".staging-my-model-999999999-0badc0de"  # a pid no process has
    killed.mkdir(parents=True)
    (killed / "config.json").write_text("{}")
    assert list_models(cache) == []  # staging folders are never listed

    prepare_model(source, cache)

    assert not killed.exists()
    assert [p.name for p in cache.iterdir()] == ["my-model"]


def test_list_models_reports_size_and_parameters(tiny_model_path: Path, tmp_path: Path) -> None:
    prepared = prepare_model(_unprepared_copy(tiny_model_path, tmp_path / "my-model"), tmp_path / "cache")
    (listed,) = list_models(tmp_path / "cache")
    assert listed.path == prepared
    assert listed.num_parameters == AutoModelForCausalLM.from_pretrained(prepared).num_parameters()
    assert listed.size_bytes > (prepared / "model.safetensors").stat().st_size
    assert list_models(tmp_path / "empty") == []


def test_cli_prepare_and_list(tiny_model_path: Path, tmp_path: Path) -> None:
    source = _unprepared_copy(tiny_model_path, tmp_path / "my-model")
    runner = CliRunner()
    result = runner.invoke(models_app, ["prepare", str(source), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "cache" / "my-model") in result.output
    result = runner.invoke(models_app, ["list", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0 and "my-model" in result.output
    result = runner.invoke(models_app, ["prepare", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1


# --------------------------------------------------------------------------- #
# The real embedded model
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_embedded_gemma_prepares_once_and_loads() -> None:
    """Uses $ALIGNLOOP_CACHE or ~/.cache/alignloop/models: ~1 min the first time, seconds after."""
    folder = prepare_model("default")
    manifest_mtime = (folder / MANIFEST_NAME).stat().st_mtime_ns

    assert prepare_model("gemma-3-270m") == folder
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime  # reused, not converted again
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".staging-gemma-3-270m")]

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model, tokenizer = load_model_and_tokenizer(folder)
    assert [tokenizer.convert_tokens_to_ids(t) for t in (START_OF_TURN, END_OF_TURN)] == [105, 106]
    assert model.generation_config.eos_token_id == [1, 106]
    text = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    ids = tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert ids["input_ids"][0, :2].tolist() == [2, 105]  # one <bos>, then a single <start_of_turn>
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 262144
    assert torch.isfinite(logits).all()


def test_attention_auto_is_eager_for_gemma_on_gpu_only(tiny_model_path):
    from training.base_models import ModelPreparationError, attention_implementation

    assert attention_implementation(tiny_model_path, "cuda") == "eager"  # the tiny model is a Gemma 3
    assert attention_implementation(tiny_model_path, "cpu") is None
    assert attention_implementation(tiny_model_path, "cuda", "sdpa") == "sdpa"
    with pytest.raises(ModelPreparationError, match="Unknown attention"):
        attention_implementation(tiny_model_path, "cpu", "fast")


def test_opening_a_new_turn_ends_a_reply_in_training_and_serving(tiny_model_path):
    from transformers import AutoTokenizer

    from chat_app.engines.chat_format import read_stop_token_ids
    from training.chat_data import stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    start = tok.convert_tokens_to_ids("<start_of_turn>")
    assert start in stop_token_ids(tok) and start in read_stop_token_ids(Path(tiny_model_path), tok)
    assert stop_token_ids(tok)[0] == tok.convert_tokens_to_ids("<end_of_turn>")  # still the one SFT learns
