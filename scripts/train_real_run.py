"""A real run on the embedded Gemma 3 270M: reward model on Anthropic HH-harmless pairs, then PPO-ptx.

    python scripts/train_real_run.py --out runs/real-1                      # the full run (hours on CPU)
    python scripts/train_real_run.py --out runs/smoke --pairs 64 --ppo-iterations 2 --max-length 256   # a smoke run

Steps, each written to --out:
  1. data/: the pairs as TRL rows (prompts split into chat turns), 20 % of prompts held out.
  2. rm/: `train_reward_model`; pairwise accuracy on the held-out prompts, training time, pairs/s.
  3. ppo/: `train_ppo` on the held-in prompts with that reward adapter; the reference is the
     base (no SFT adapter: HH has no demonstrations), the ptx corpus is the preferred replies.
  4. report.json and report.md: reward gain vs KL, ptx perplexity before/after, sample replies.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"


def main(
    out: Annotated[Path, typer.Option(help="A new folder for everything this run writes.")] = Path("runs/real-run"),
    data: Annotated[Path, typer.Option(help="HH pairs (.jsonl.gz with prompt/chosen/rejected).")] = DEFAULT_DATA,
    base_model: Annotated[str, typer.Option(help="Base model ('default': embedded Gemma 3 270M).")] = "default",
    pairs: Annotated[int, typer.Option(help="Use the first N pairs after shuffling (0: all).")] = 0,
    max_length: Annotated[int, typer.Option(help="Prompt + reply tokens.")] = 512,
    rm_epochs: Annotated[float, typer.Option(help="Reward model epochs.")] = 1.0,
    rm_batch: Annotated[int, typer.Option(help="Prompts per reward-model step.")] = 8,
    rm_micro_batch: Annotated[int, typer.Option(help="Prompts per forward/backward in a step (0: all; lowers memory).")] = 4,
    ppo_iterations: Annotated[int, typer.Option(help="PPO iterations.")] = 50,
    ppo_batch: Annotated[int, typer.Option(help="Prompts per PPO iteration.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Longest sampled reply.")] = 64,
    ptx_coef: Annotated[float, typer.Option(help="InstructGPT's gamma for the ptx term.")] = 1.0,
    ppo_max_length: Annotated[int, typer.Option(help="Prompt + reply tokens in PPO (oldest prompt tokens cut).")] = 256,
    ptx_max_length: Annotated[int, typer.Option(help="Longest ptx document in tokens.")] = 128,
    ppo_epochs: Annotated[int, typer.Option(help="PPO epochs per rollout batch.")] = 2,
    ppo_lr: Annotated[float, typer.Option(help="PPO learning rate (LoRA adapters take larger steps than full weights).")] = 5e-5,
    skip_ppo: Annotated[bool, typer.Option(help="Stop after the reward model.")] = False,
    rm_adapter: Annotated[Optional[Path], typer.Option(help="Reuse this reward adapter instead of training one.")] = None,
    seed: int = 0,
) -> None:
    """Reward model then PPO-ptx on HH-harmless; print and save a report."""
    from feedback_db import read_jsonl
    from feedback_db.analytics import wilson_interval
    from training.config import LoraSettings, PPOConfig, RewardConfig
    from training.ppo import train_ppo
    from training.reward_model import train_reward_model

    out.mkdir(parents=True, exist_ok=True)
    rows = list(read_jsonl(data))
    random.Random(seed).shuffle(rows)
    if pairs:
        rows = rows[:pairs]
    (out / "data").mkdir(exist_ok=True)
    prefs = out / "data" / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report: dict = {"data": str(data), "pairs": len(rows), "base_model": base_model, "max_length": max_length}

    # ---- 2. Reward model: 20 % of prompts held out ------------------------------------------------
    lora = LoraSettings(r=16, alpha=32)
    if rm_adapter is None:
        rm_cfg = RewardConfig(base_model=base_model, data=str(prefs), output_dir=str(out / "rm"), eval_fraction=0.2,
                              epochs=rm_epochs, groups_per_batch=rm_batch, micro_batch_groups=rm_micro_batch, max_length=max_length, seed=seed, lora=lora)
        started = time.perf_counter()
        rm = train_reward_model(rm_cfg)
        # One HH pair per prompt, prompts held out whole: the pairs are independent draws (Wilson interval).
        low, high = (wilson_interval(round(rm.eval_accuracy * rm.eval_pairs), rm.eval_pairs) if rm.eval_pairs
                     else (math.nan, math.nan))
        report["reward_model"] = {
            "adapter": str(rm.adapter_dir), "held_out_accuracy": rm.eval_accuracy, "held_out_pairs": rm.eval_pairs,
            "held_out_accuracy_95ci": [low, high],
            "train_pairs": rm.train_pairs, "train_seconds": rm.train_seconds, "pairs_per_second": rm.pairs_per_second,
            "total_seconds": time.perf_counter() - started, "shift": rm.shift, "std": rm.std,
        }
        rm_adapter = rm.adapter_dir
        typer.echo(f"RM: held-out accuracy {rm.eval_accuracy:.3f} [{low:.3f}, {high:.3f}] on {rm.eval_pairs} pairs; "
                   f"{rm.train_pairs} pairs in {rm.train_seconds:.0f} s ({rm.pairs_per_second:.2f} pairs/s)")
    if skip_ppo:
        _write_report(out, report)
        return

    # ---- 3. PPO-ptx on the prompts, ptx on the preferred replies -----------------------------------
    prompts = out / "data" / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    demos = out / "data" / "chosen.jsonl"
    demos.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    ppo_cfg = PPOConfig(base_model=base_model, prompts=str(prompts), reward_adapter=str(rm_adapter), sft_data=str(demos),
                        output_dir=str(out / "ppo"), iterations=ppo_iterations, rollout_batch=ppo_batch,
                        minibatch=min(4, ppo_batch), ppo_epochs=ppo_epochs, max_new_tokens=max_new_tokens,
                        max_length=ppo_max_length, ptx_coef=ptx_coef, ptx_batch=min(4, ppo_batch),
                        ptx_max_length=ptx_max_length, lr=ppo_lr, init_kl_coef=0.05, target_kl=6.0,
                        missing_eos_penalty=1.0, seed=seed, lora=lora)
    ppo = train_ppo(ppo_cfg)
    from training.metrics_log import read_metrics

    log = [r for r in read_metrics(ppo.metrics_path) if "reward/mean" in r]
    head, tail = log[: max(1, len(log) // 5)], log[-max(1, len(log) // 5) :]
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    report["ppo"] = {
        "adapter": str(ppo.adapter_dir), "iterations": ppo.iterations, "seconds": ppo.seconds,
        "reward_start": mean(head, "reward/mean"), "reward_end": mean(tail, "reward/mean"),
        "kl_end": mean(tail, "kl/per_reply"), "beta_end": tail[-1]["kl/beta"],
        "ptx_perplexity_before": math.exp(ppo.ptx_nll_before), "ptx_perplexity_after": math.exp(ppo.ptx_nll_after),
        "time_split_s": {k: mean(log, f"time/{k}_s") for k in ("generation", "scoring", "update")},
        "memory": ppo.memory, "peak_memory_mb": max(r["memory/peak_mb"] for r in log), "samples": ppo.samples,
    }
    p = report["ppo"]
    typer.echo(f"PPO: reward {p['reward_start']:+.3f} -> {p['reward_end']:+.3f} at KL {p['kl_end']:.2f} nats; "
               f"ptx perplexity {p['ptx_perplexity_before']:.1f} -> {p['ptx_perplexity_after']:.1f}")
    _write_report(out, report)


def _write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = ["# Real run", "", "```json", json.dumps({k: v for k, v in report.items() if k != "ppo"}, indent=2, default=str), "```"]
    if "ppo" in report:
        ppo = {k: v for k, v in report["ppo"].items() if k != "samples"}
        lines += ["", "## PPO-ptx", "", "```json", json.dumps(ppo, indent=2, default=str), "```", "", "## Sample replies", ""]
        for s in report["ppo"]["samples"]:
            prompt = s["prompt"][-1]["content"] if isinstance(s["prompt"], list) else s["prompt"]
            lines += [f"- **{prompt[:200]}** → {s['reply'][:300]!r} (reward {s['score']:+.2f})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    typer.echo(f"Report: {out / 'report.md'}")


if __name__ == "__main__":
    typer.run(main)
