"""`alignloop models ...`: prepare and list base models (mirrors training.base_models).

torch and transformers are imported inside the commands so `alignloop --help` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from training.base_models import DEFAULT_MODEL_NAME, ModelPreparationError, default_cache_dir, list_models

models_app = typer.Typer(
    help="Prepare base models (convert once, cache as safetensors) and list the prepared ones.",
    no_args_is_help=True,
    add_completion=False,
)

CacheDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--cache-dir",
        help="Folder of prepared models. Default: $ALIGNLOOP_CACHE, else ~/.cache/alignloop/models.",
        show_default=False,
    ),
]


@models_app.command("prepare")
def prepare_command(
    name_or_path: Annotated[
        str,
        typer.Argument(
            help=f"'default' ({DEFAULT_MODEL_NAME}, embedded), a model folder, a .gguf file, or a Hugging Face id."
        ),
    ] = "default",
    cache_dir: CacheDirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Prepare again even if already cached.")] = False,
) -> None:
    """Convert a model once into a cached folder that loads in seconds; print the folder and load time.

    Example: alignloop models prepare            (the embedded Gemma 3 270M, ~1 min the first time)

    Example: alignloop models prepare ./my-model --cache-dir /data/models
    """
    from training.base_models import load_model_and_tokenizer, prepare_model

    started = time.perf_counter()
    try:
        folder = prepare_model(name_or_path, cache_dir, force=force)
    except ModelPreparationError as exc:
        typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    prepared_s = time.perf_counter() - started
    import transformers  # noqa: F401  (so the load time below is the load alone)

    started = time.perf_counter()
    model, _ = load_model_and_tokenizer(folder)
    load_s = time.perf_counter() - started
    typer.echo(f"Prepared {folder} in {prepared_s:.1f} s")
    typer.echo(f"Loaded {model.num_parameters():,} parameters from it in {load_s:.1f} s")


@models_app.command("list")
def list_command(cache_dir: CacheDirOption = None) -> None:
    """List prepared models: name, size, parameters, source, folder.

    Example: alignloop models list --cache-dir /data/models
    """
    models = list_models(cache_dir)
    if not models:
        where = cache_dir or default_cache_dir()
        typer.echo(f"No prepared models in {where}. Prepare one with: alignloop models prepare")
        return
    typer.echo(f"{'NAME':<24} {'SIZE':>9} {'PARAMS':>8}  SOURCE / PATH")
    for m in models:
        params = f"{m.num_parameters / 1e6:.1f}M" if m.num_parameters else "?"
        typer.echo(f"{m.name:<24} {m.size_bytes / 2**20:>7.1f}MB {params:>8}  {m.source}")
        typer.echo(f"{'':<24} {'':>9} {'':>8}  {m.path}")


if __name__ == "__main__":
    models_app()
