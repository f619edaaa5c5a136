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


# --------------------------------------------------------------------------- #
# `alignloop train sft|rm|ppo`: the same dataclass configs as the Python API
# --------------------------------------------------------------------------- #

train_app = typer.Typer(
    help="Train LoRA adapters InstructGPT-style: SFT, reward model, PPO-ptx. Every field of the run's config "
    "can be set with --set key=value (nested: --set lora.r=8); --show-config lists them.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigFileOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="Start from a JSON config (e.g. a previous run's train_config.json).",
                 show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any config field: --set lr=1e-4 --set lora.r=8.", show_default=False),
]
ShowConfigOption = Annotated[bool, typer.Option("--show-config", help="Print the resolved config and exit.")]
BaseModelOption = Annotated[
    Optional[str], typer.Option("--base-model", help="Prepared folder, .gguf, HF id or 'default'.", show_default=False)
]
OutputOption = Annotated[
    Optional[Path],
    typer.Option("--output-dir", "-o", help="A new folder for the adapter and its logs (default: the config's).",
                 show_default=False),
]


def _resolve_config(cls: type, config_file: Optional[Path], overrides: Optional[list[str]], **fields: object):
    """Config = defaults ← --config file ← named options ← --set overrides."""
    import dataclasses

    from training.config import apply_overrides, coerce, load_config

    cfg = load_config(cls, config_file) if config_file else cls()
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    for name, value in fields.items():
        if value is not None:  # checked like --set (e.g. a Literal's choices)
            setattr(cfg, name, coerce(str(value), types[name]) if isinstance(value, (str, Path)) else value)
    return apply_overrides(cfg, overrides or [])


def _run(cls: type, show: bool, config_file: Optional[Path], overrides: Optional[list[str]], train, **fields: object):
    import json

    from training.chat_data import DataError
    from training.config import ConfigError

    try:
        cfg = _resolve_config(cls, config_file, overrides, **fields)
        if show:
            typer.echo(json.dumps(cfg.to_dict(), indent=2))
            return None
        return train(cfg)
    except (ConfigError, DataError, ModelPreparationError) as exc:
        typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


@train_app.command("sft")
def train_sft_command(
    data: Annotated[Path, typer.Argument(help="Demonstrations JSONL (`alignloop db export sft`).")],
    output_dir: OutputOption = None,
    base_model: BaseModelOption = None,
    config_file: ConfigFileOption = None,
    overrides: SetOption = None,
    show_config: ShowConfigOption = False,
) -> None:
    """Supervised fine-tuning: demonstrations -> a policy LoRA adapter (loss on reply tokens only).

    Example: alignloop train sft sft.jsonl -o runs/sft-1 --set epochs=3 --set lr=1e-4
    """
    from training.config import SFTConfig

    def train(cfg: SFTConfig) -> None:
        from training.sft import train_sft

        r = train_sft(cfg)
        typer.echo(f"SFT adapter: {r.adapter_dir}  ({r.steps} steps, loss {r.first_loss:.3f} -> {r.final_loss:.3f}, "
                   f"{r.seconds:.0f} s)")
        t = r.truncation
        typer.echo(f"Truncation: {t.prompts_cut}/{t.prompts} prompts and {t.replies_cut}/{t.replies} replies cut")

    _run(SFTConfig, show_config, config_file, overrides, train, data=data, output_dir=output_dir, base_model=base_model)


@train_app.command("rm")
def train_rm_command(
    data: Annotated[Optional[Path], typer.Argument(help="Preferences JSONL: groups or TRL prompt/chosen/rejected rows (optional with --thumbs-data).", show_default=False)] = None,
    thumbs_data: Annotated[Optional[Path], typer.Option("--thumbs-data", help="Unpaired 👍/👎 JSONL in TRL's KTO format {prompt, completion, label} (`alignloop db export --kind thumbs`).", show_default=False)] = None,
    output_dir: OutputOption = None,
    base_model: BaseModelOption = None,
    init_adapter: Annotated[Optional[Path], typer.Option("--init-adapter", help="Warm start from a previous reward adapter.", show_default=False)] = None,
    config_file: ConfigFileOption = None,
    overrides: SetOption = None,
    show_config: ShowConfigOption = False,
) -> None:
    """Reward model: base + LoRA + scalar head on K-wise comparisons (InstructGPT eq. 1) and unpaired 👍/👎.

    Example: alignloop train rm prefs.jsonl -o runs/rm-1 --set eval_fraction=0.2

    Example: alignloop train rm prefs.jsonl --thumbs-data thumbs.jsonl -o runs/rm-1 --set pointwise_weight=0.5

    Example: alignloop db export preferences --format groups -o prefs.jsonl && alignloop train rm prefs.jsonl -o runs/rm-2 --init-adapter runs/rm-1
    """
    from training.config import RewardConfig

    def train(cfg: RewardConfig) -> None:
        from training.reward_model import train_reward_model

        r = train_reward_model(cfg)
        typer.echo(f"Reward adapter: {r.adapter_dir}  held-out accuracy {r.eval_accuracy:.3f} on {r.eval_pairs} pairs, "
                   f"{r.pairs_per_second:.1f} pairs/s, shift {r.shift:+.3f}, std {r.std:.3f}")
        if r.thumbs_train:
            typer.echo(f"👍/👎: {r.thumbs_train} rated replies trained on, held-out accuracy {r.thumbs_eval_accuracy:.3f}, "
                       f"threshold {r.threshold:+.3f}")
        t = r.truncation
        typer.echo(f"Truncation: {t.prompts_cut}/{t.prompts} prompts and {t.replies_cut}/{t.replies} replies cut")

    _run(RewardConfig, show_config, config_file, overrides, train, data=data, thumbs_data=thumbs_data, output_dir=output_dir,
         base_model=base_model, init_adapter=init_adapter)


# The key under which the top-level `alignloop` app (chat_app/cli.py) puts a rollout sampler factory
# in the click context's ``obj``: training never imports chat_app, so the vLLM sampler comes from above.
SAMPLER_FACTORY_KEY = "ppo_sampler_factory"


@train_app.command("ppo")
def train_ppo_command(
    ctx: typer.Context,
    prompts: Annotated[Path, typer.Argument(help="Prompts JSONL (`alignloop db export prompts`).")],
    reward_adapter: Annotated[Path, typer.Option("--reward-adapter", help="Reward adapter from `alignloop train rm`.")],
    output_dir: OutputOption = None,
    sft_adapter: Annotated[Optional[Path], typer.Option("--sft-adapter", help="SFT adapter: the frozen KL reference and, unless --init-adapter, the policy start.", show_default=False)] = None,
    init_adapter: Annotated[Optional[Path], typer.Option("--init-adapter", help="Start the policy from this adapter (e.g. the live policy) instead of the SFT adapter.", show_default=False)] = None,
    sft_data: Annotated[Optional[Path], typer.Option("--sft-data", help="Demonstrations; the default ptx corpus.", show_default=False)] = None,
    pretrain_data: Annotated[Optional[Path], typer.Option("--pretrain-data", help="ptx corpus (.txt or .jsonl).", show_default=False)] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="Rollout engine: auto (vLLM on a GPU, else HF) | vllm (the chat app's vLLM engine) | hf (generate on the training model).", show_default=False)] = None,
    base_model: BaseModelOption = None,
    config_file: ConfigFileOption = None,
    overrides: SetOption = None,
    show_config: ShowConfigOption = False,
) -> None:
    """PPO-ptx (InstructGPT eq. 2): policy, reference, reward and value as adapters on one base model.

    Example: alignloop train ppo prompts.jsonl --reward-adapter runs/rm-1 --sft-adapter runs/sft-1 --sft-data sft.jsonl -o runs/ppo-1 --set iterations=200 --set ptx_coef=1.0

    Example: alignloop train ppo prompts.jsonl --reward-adapter runs/rm-1 --sampler vllm -o runs/ppo-2   (rollouts on vLLM, GPU)

    Metrics: runs/ppo-1/metrics.jsonl and `tensorboard --logdir runs/ppo-1`.
    """
    from training.config import PPOConfig

    def train(cfg: PPOConfig) -> None:
        from training.ppo import train_ppo

        r = train_ppo(cfg, sampler_factory=(ctx.obj or {}).get(SAMPLER_FACTORY_KEY))
        typer.echo(f"Policy adapter: {r.adapter_dir}  reward {r.reward_first:+.3f} -> {r.reward_last:+.3f}, "
                   f"KL {r.kl_last:.3f}, ptx NLL held-out {r.ptx_nll_before:.3f} -> {r.ptx_nll_after:.3f} "
                   f"(trained-on {r.ptx_train_nll_before:.3f} -> {r.ptx_train_nll_after:.3f}), "
                   f"memory {r.memory['shared_mb']:.0f} MB vs {r.memory['four_models_mb']:.0f} MB for four models")

    _run(PPOConfig, show_config, config_file, overrides, train, prompts=prompts, reward_adapter=reward_adapter,
         output_dir=output_dir, sft_adapter=sft_adapter, init_adapter=init_adapter, sft_data=sft_data,
         pretrain_data=pretrain_data, sampler=sampler, base_model=base_model)
