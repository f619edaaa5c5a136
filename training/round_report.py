"""A Markdown report per round, with PNG plots: data counts, reward model, PPO curves, samples.

Operators read the report rendered as Markdown in the dashboard, and it quotes user prompts and model
replies. Text that is not ours is therefore shown as text, never as markup: whole prompts and replies go
into fenced code blocks (``fenced_text``), and short strings inside tables and lines are escaped
(``escape_markdown_inline``), so a prompt cannot add a "Gates: passed" heading, fetch a remote image or
inject HTML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Characters that start inline Markdown or GFM constructs (emphasis, code, links, images, tables,
# strikethrough, headings, escapes); each is shown literally when preceded by a backslash.
_INLINE_MARKUP = re.compile(r"([\\`*_\[\]()!|~#])")
# Line breaks of every kind, including the ones str.splitlines() knows but Markdown may not.
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
# Block markers that only matter at the start of a line: bullets, thematic breaks, setext underlines,
# and the "." or ")" of an ordered list item ("1. ").
_LEADING_BLOCK_MARKER = re.compile(r"^(\s*(?:\d+)?)([-+=.)])")


def escape_markdown_inline(text: str) -> str:
    """``text`` as one line of literal Markdown text, safe in a table cell or after a label.

    Line breaks become spaces (a newline would end a table row or start a new block); inline markup
    characters are backslash-escaped (CommonMark lets any ASCII punctuation be escaped, ``\\|`` included
    inside GFM table cells); ``& < >`` become HTML entities so no tag or entity is interpreted; a leading
    list, rule or setext marker is escaped; and bare ``http://`` / ``www.`` links are broken so GFM does
    not autolink them.
    """
    text = _LINE_BREAKS.sub(" ", text)
    text = _INLINE_MARKUP.sub(r"\\\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r":(?=//)", r"\\:", text)
    text = re.sub(r"(?i)\b(www)\.", r"\1\\.", text)
    return _LEADING_BLOCK_MARKER.sub(r"\1\\\2", text, count=1)


def fenced_text(text: str) -> list[str]:
    """``text`` as the lines of a fenced code block, shown verbatim whatever it contains.

    The fence is one backtick longer than the longest backtick run in ``text`` (and at least three), so no
    line of the text can close it; inside a code block Markdown, HTML and links are not interpreted.
    """
    text = _LINE_BREAKS.sub("\n", text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", *text.split("\n"), fence]


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


def _plot_rm_accuracy(history: list[dict[str, Any]], floor: float | None, path: Path) -> bool:
    """Held-out pairwise accuracy of each round's reward model (bars), with the floor; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    labels = [f"round {h['round']}" for h in history]
    ax.bar(labels, [h["accuracy"] for h in history], color=["tab:gray"] * (len(history) - 1) + ["tab:blue"])
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", label="chance")
    if floor is not None:
        ax.axhline(floor, color="tab:red", linewidth=1, linestyle="--", label=f"floor {floor:g}")
    ax.set(ylim=(0, 1), title="reward model: held-out pairwise accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _sample_lines(sample: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    """A prompt and the live and candidate replies (with the proxy's and the judge's rewards when scored),
    each fenced: they are user and model text."""
    lines = ["**Prompt:**", "", *fenced_text(_prompt_text(sample["prompt"])), ""]
    for side, label in zip(("live", "candidate"), labels):
        scores = [f"{name} {sample[key]:.3f}" for name, key in (("proxy", f"reward_{side}"), ("judge", f"judge_{side}"))
                  if sample.get(key) is not None]
        scored = f" ({', '.join(scores)})" if scores else ""
        lines += [f"**{label}**{scored}:", "", *fenced_text(str(sample[side])), ""]
    return lines


def _fmt(value: Any) -> str:
    """A metric's value as one escaped Markdown cell: numbers rounded, ``[lo, hi]`` intervals, text escaped."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, (int, float)) for v in value):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return escape_markdown_inline(str(value))


GATES_NOTE = ("Each gate is *passed* when its whole 95% interval is on the good side of the threshold, *failed* "
              "when it is wholly on the bad side, and *not enough evidence* otherwise (the interval straddles the "
              "threshold, too few held-out prompts or pairs, or no judge). A candidate can be auto-promoted by "
              "users' Compare votes when every gate passed, or (auto_promotable, with users_settle_undecided) when "
              "the only others are reward-model or judge gates whose interval straddles the threshold on enough "
              "held-out units. KL and ptx perplexity are single measurements (no interval) and always decide.")


def _gate_lines(gates: dict[str, dict[str, Any]]) -> list[str]:
    """The gates as a table: verdict, value, 95% interval, units, threshold, why."""
    lines = ["", "## Gates", "", GATES_NOTE, "", "| gate | verdict | value | 95% interval | n | threshold | note |",
             "|---|---|---|---|---|---|---|"]
    for name, g in gates.items():
        if not isinstance(g, dict):  # a round recorded before verdicts had intervals
            lines.append(f"| {_fmt(name)} | {'passed' if g else 'failed'} | | | | | |")
            continue
        ci = _fmt(g["ci"]) if g.get("ci") else "–"
        lines.append(f"| {_fmt(name)} | **{_fmt(g['verdict'])}** | {_fmt(g.get('value'))} | {ci} | {_fmt(g.get('n'))} "
                     f"| {_fmt(g.get('threshold'))} | {_fmt(g.get('note', ''))} |")
    return lines


def _timing_lines(step_seconds: dict[str, float]) -> list[str]:
    """Where the round's wall time went, step by step, with each step's share."""
    total = sum(step_seconds.values()) or 1.0
    lines = ["", "## Where the time went", "", "| step | seconds | share |", "|---|---|---|"]
    lines += [f"| {_fmt(step)} | {seconds:.1f} | {seconds / total:.0%} |" for step, seconds in step_seconds.items()]
    return lines + [f"| total | {sum(step_seconds.values()):.1f} | |"]


def _prompt_text(prompt: Any) -> str:
    """A prompt's user text: the string itself, or its user turns joined (a conversation)."""
    if isinstance(prompt, str):
        return prompt
    return " / ".join(m.get("content", "") for m in prompt if m.get("role") == "user")


def write_round_report(round_dir: Path, round_id: int, status: str, metrics: dict[str, Any]) -> Path:
    """Write ``<round_dir>/report.md`` (and ``ppo_curves.png``, ``rm_accuracy.png``); return the report's path."""
    round_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Training round {round_id}: {escape_markdown_inline(status)}", "",
             escape_markdown_inline(str(metrics.get("reason", ""))), ""]
    lines += ["| | |", "|---|---|"]
    for key in ("mode", "snapshot", "live_policy", "candidate", "gates_passed", "auto_promotable"):
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    for title, key in (("Data", "data"), ("SFT", "sft"), ("Reward model", "reward_model"),
                       ("Judge (a reward model PPO did not optimise)", "judge"),
                       ("Candidate vs live (held-out prompts; gains paired per prompt, 95% bootstrap interval)",
                        "evaluation")):
        if metrics.get(key):
            lines += ["", f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in metrics[key].items()]
    if metrics.get("gates"):
        lines += _gate_lines(metrics["gates"])
    if metrics.get("step_seconds"):
        lines += _timing_lines(metrics["step_seconds"])
    history = metrics.get("reward_model_history")
    if history and _plot_rm_accuracy(history, (metrics.get("reward_model") or {}).get("floor"),
                                     round_dir / "rm_accuracy.png"):
        lines += ["", "![reward model held-out accuracy per round](rm_accuracy.png)"]
    ppo = metrics.get("ppo")
    if ppo:
        lines += ["", "## PPO-ptx", "", "| | |", "|---|---|"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in ppo.items() if k != "curve"]
        if ppo.get("curve") and _plot_curve(ppo["curve"], round_dir / "ppo_curves.png"):
            lines += ["", "![reward and KL per iteration](ppo_curves.png)"]
    sections = (("samples", "Sample replies on held-out prompts (greedy)", ("live", "candidate")),
                ("fixed_samples", "Before and after on the fixed prompts (greedy; the same prompts every round)",
                 ("before (live)", "after (candidate)")))
    for key, title, labels in sections:
        if metrics.get(key):
            lines += ["", f"## {title}", ""] + [line for s in metrics[key] for line in _sample_lines(s, labels)]
    if metrics.get("error"):
        lines += ["", "## Error", "", *fenced_text(str(metrics.get("traceback") or metrics["error"]))]
    path = round_dir / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
