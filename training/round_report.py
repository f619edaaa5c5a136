"""A Markdown report per round, with PNG plots: data counts, reward model, PPO curves, samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _plot_curve(curve: list[dict[str, Any]], path: Path) -> bool:
    """Reward and KL per PPO iteration as one PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [p.get("iteration") or i + 1 for i, p in enumerate(curve)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [p["reward"] for p in curve], marker="o")
    ax1.set(title="reward (mean per batch)", xlabel="PPO iteration")
    ax2.plot(steps, [p["kl"] for p in curve], marker="o", color="tab:red")
    ax2.set(title="KL to reference (nats / reply)", xlabel="PPO iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return " / ".join(m.get("content", "") for m in prompt if m.get("role") == "user")


def write_round_report(round_dir: Path, round_id: int, status: str, metrics: dict[str, Any]) -> Path:
    """Write ``<round_dir>/report.md`` (and ``ppo_curves.png``); return the report's path."""
    round_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Training round {round_id}: {status}", "", f"{metrics.get('reason', '')}", ""]
    lines += ["| | |", "|---|---|"]
    for key in ("mode", "snapshot", "live_policy", "candidate", "gates_passed"):
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    for title, key in (("Data", "data"), ("SFT", "sft"), ("Reward model", "reward_model"),
                       ("Candidate vs live", "evaluation"), ("Gates", "gates")):
        if metrics.get(key):
            lines += ["", f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics[key].items()]
    ppo = metrics.get("ppo")
    if ppo:
        lines += ["", "## PPO-ptx", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ppo.items() if k != "curve"]
        if ppo.get("curve") and _plot_curve(ppo["curve"], round_dir / "ppo_curves.png"):
            lines += ["", "![reward and KL per iteration](ppo_curves.png)"]
    if metrics.get("samples"):
        lines += ["", "## Sample replies on held-out prompts (greedy)", ""]
        for s in metrics["samples"]:
            lines += [f"**Prompt:** {_prompt_text(s['prompt'])}", "",
                      f"* live ({s['reward_live']:.3f}): {json.dumps(s['live'], ensure_ascii=False)}",
                      f"* candidate ({s['reward_candidate']:.3f}): {json.dumps(s['candidate'], ensure_ascii=False)}", ""]
    if metrics.get("error"):
        lines += ["", "## Error", "", "```", str(metrics.get("traceback") or metrics["error"]), "```"]
    path = round_dir / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
