"""The Dashboard tab (operators): feedback over time, thumbs per version, candidate win rate, the
leaderboard of every version, training rounds (the running one's progress, and a button that starts
one), and promote / roll back. Every handler is `admin_only` (chat_app/auth.py): the server
checks the login or the admin password on each call and records who promoted or rolled back."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import gradio as gr
import matplotlib
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from feedback_db import feedback_over_time, leaderboard, thumbs_by_version, win_rate  # noqa: E402
from training.round_config import RoundConfig  # noqa: E402

from ..auth import AdminGuard, admin_only  # noqa: E402
from ..round_process import start_round as launch_round  # noqa: E402
from ..runtime import Runtime  # noqa: E402
from .common import show_error  # noqa: E402
from .rendering import progress_text  # noqa: E402

log = logging.getLogger(__name__)


def _empty(ax, text: str) -> None:
    """An empty panel says why it is empty and what fills it."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.axis("off")


def _feedback_plot(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 3))
    if not rows:
        _empty(ax, "No feedback yet: thumbs, Compare votes, rankings and better replies appear here per hour.")
        return fig
    buckets = sorted({r["bucket"] for r in rows})
    kinds = sorted({r["kind"] for r in rows})
    counts = defaultdict(int, {(r["bucket"], r["kind"]): r["n"] for r in rows})
    bottom = [0] * len(buckets)
    for kind in kinds:
        values = [counts[(b, kind)] for b in buckets]
        ax.bar(range(len(buckets)), values, bottom=bottom, label=kind)
        bottom = [x + y for x, y in zip(bottom, values)]
    ax.set_xticks(range(len(buckets)), [b[5:].replace("T", " ") + "h" for b in buckets], rotation=45, fontsize=7)
    ax.set_title("Feedback per hour (UTC)")
    if kinds:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _thumbs_plot(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 3))
    if not rows:
        _empty(ax, "No thumbs yet: the share of thumbs-up per model version appears here (each user's latest rating).")
        return fig
    names = [r["model_version"] for r in rows]
    rates = [r["up_rate"] or 0 for r in rows]
    bars = ax.bar(range(len(names)), rates, color="#4a8")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['thumbs_up']}/{r['thumbs_up'] + r['thumbs_down']}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_title("Thumbs-up rate per model version")
    fig.tight_layout()
    return fig


def _win_plot(wr):
    fig, ax = plt.subplots(figsize=(7, 2.2))
    if wr is None or wr.rate is None:
        _empty(ax, "No decisive Compare votes between a candidate and live yet: a round registers a candidate, "
                   "and Compare then pits it against live.")
    else:
        ax.errorbar([wr.rate], [0], xerr=[[wr.rate - wr.ci_low], [wr.ci_high - wr.rate]], fmt="o", capsize=6)
        ax.axvline(0.5, color="grey", linestyle="--")
        ax.set_xlim(0, 1)
        ax.set_yticks([])
        ax.set_title(f"{wr.candidate} vs {wr.baseline}: win rate {wr.rate:.0%} "
                     f"(95% CI {wr.ci_low:.0%}–{wr.ci_high:.0%}), {wr.decisive} decisive votes")
    fig.tight_layout()
    return fig


def build_dashboard_tab(rt: Runtime, guard: AdminGuard | None = None) -> None:
    """The Dashboard tab; `guard` decides who is the admin (default: from rt's admin password and admin users)."""
    admin = admin_only(guard or AdminGuard(rt.admin_password, rt.admin_users))
    with gr.Row():
        password = gr.Textbox(label="Admin password", type="password", scale=4, elem_id="admin-password")
        unlock = gr.Button("Open dashboard", scale=1, elem_id="admin-unlock")
    with gr.Column(visible=False) as panel:
        summary = gr.Markdown("")
        refresh = gr.Button("↻ Refresh")
        with gr.Row():
            feedback_plot = gr.Plot(label="Feedback over time")
            thumbs_plot = gr.Plot(label="Thumbs-up rate per version")
        win_plot = gr.Plot(label="Candidate vs live")
        board = gr.Dataframe(label="Leaderboard: Bradley–Terry ratings from every Compare vote (Elo scale, 95% "
                                   "bootstrap intervals; `alignloop db leaderboard`)", interactive=False,
                             elem_id="leaderboard")
        rounds = gr.Dataframe(label="Training rounds", interactive=False)
        versions = gr.Dataframe(label="Model versions", interactive=False)
        with gr.Accordion("Round reports", open=False):
            report_pick = gr.Dropdown(label="Round", choices=[], elem_id="report-pick", allow_custom_value=True)
            report_md = gr.Markdown("", elem_id="report-body")
            report_plots = gr.Gallery(label="Plots", columns=2, height="auto")
        with gr.Row():
            candidate = gr.Dropdown(label="Version to promote", choices=[], scale=3)
            promote = gr.Button("Promote to live", variant="primary", scale=1)
            rollback = gr.Button("Roll back", variant="stop", scale=1)
        with gr.Row():
            start_round = gr.Button("Start a round now", scale=1, elem_id="round-start")
            gr.Markdown("Trains on all feedback so far, as `alignloop round` (or its cron job) does; "
                        "its progress shows above, and its candidate appears in Compare.", elem_id="round-help")
        action = gr.Markdown("")

    @admin
    def refresh_data(_actor: str):
        svc = rt.require()
        store, reg, router = svc.store, svc.registry, svc.router
        live, cand = router.live, router.candidate
        wr = win_rate(store, cand.version_id, live.version_id) if cand and live else None
        round_rows = [[r.id, r.status, r.started_at, r.finished_at, r.snapshot_event_id,
                       ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.metrics.items()),
                       r.report_path or ""] for r in reg.rounds()]
        version_rows = [[v.id, v.name, v.kind, v.status, v.adapter_path or "(base)", v.created_at]
                        for v in reg.list() if v.kind != "external"]
        errors = "".join(f"\n\n⚠️ cannot serve `{n}`: {e}" for n, e in router.load_errors.items())
        stats = store.stats()["counts"]
        running = reg.running_round()
        training = (f"\n\n**Training:** round {running.id} (since {running.started_at[:19].replace('T', ' ')} UTC): "
                    f"{progress_text(running.metrics.get('progress') or {})}" if running else "")
        text = (f"**Live:** `{live.name if live else '-'}` · **Candidate:** `{cand.name if cand else 'none'}` · "
                f"messages {stats['messages']:,} · ratings {stats['ratings']:,} · comparisons {stats['comparisons']:,}"
                f" · rankings {stats['rankings']:,} · demonstrations {stats['demonstrations']:,}{training}{errors}")
        choices = [(v["label"], v["name"]) for v in svc.promotable_versions()]  # servable here
        figs = (_feedback_plot(feedback_over_time(store)), _thumbs_plot(thumbs_by_version(store)), _win_plot(wr))
        for f in figs:
            plt.close(f)
        reports = [(f"round {r.id} ({r.status})", r.id) for r in reversed(reg.rounds()) if r.report_path]
        board_rows = [[r.rank, r.name, round(r.rating), f"[{r.ci_low:.0f}, {r.ci_high:.0f}]", r.votes,
                       f"{r.wins}/{r.losses}/{r.ties}"] for r in leaderboard(store)]
        return (gr.Column(visible=True), text, *figs, gr.Dropdown(choices=reports),
                gr.Dataframe(value=round_rows or [["", "no training rounds yet: `alignloop round` trains one on the "
                                                   "feedback so far (or cron it; see the README)", "", "", "", "", ""]],
                             headers=["round", "status", "started", "finished", "snapshot",
                                                        "metrics", "report"]),
                gr.Dataframe(value=version_rows, headers=["id", "name", "kind", "status", "adapter", "created"]),
                gr.Dropdown(choices=choices, value=cand.name if cand and cand.name in {n for _, n in choices} else None),
                gr.Dataframe(value=board_rows or [["", "no Compare votes between two versions yet", "", "", "", ""]],
                             headers=["rank", "version", "rating", "95% interval", "votes", "won/lost/tied"]))

    @admin
    def show_report(_actor: str, round_id):
        if round_id is None:
            return "", []
        path = rt.require().registry.get_round(int(round_id)).report_path
        if not path or not Path(path).is_file():
            return f"The report of round {round_id} is missing (was `{path}` moved?).", []
        report = Path(path)
        # The report's own plots are shown in the gallery; the Markdown keeps the text and tables (user text
        # in it is fenced by training.round_report, so only the report's plot lines are dropped here).
        plots = {f"]({p.name})" for p in report.parent.glob("*.png")}
        text = "\n".join(line for line in report.read_text().splitlines()
                         if not (line.startswith("![") and any(line.endswith(p) for p in plots)))
        # Loaded here (not served by path) so the round folders need not be exposed to Gradio.
        return text, [Image.open(p).copy() for p in sorted(report.parent.glob("*.png"))]

    @admin
    async def on_promote(actor: str, name):
        if not name:
            raise gr.Error("Choose a version to promote.", print_exception=False)
        try:
            live = await rt.require().promote(name, actor=actor)
        except Exception as exc:
            raise show_error(exc) from exc
        return f"✅ `{live}` is live; new requests use it now."

    @admin
    def on_start_round(actor: str):
        """A round in the background, one at a time (also none while `alignloop round` or cron runs one)."""
        svc = rt.require()
        running = svc.registry.running_round()
        if running is not None or (rt.round_process is not None and rt.round_process.poll() is None):
            which = f"round {running.id}" if running else "the round started from here"
            raise gr.Error(f"A round is already running ({which}); wait until it ends.", print_exception=False)
        rt.round_process, log_path = launch_round(svc.store.path, rt.base_model,
                                                  rt.rounds_dir or Path(RoundConfig().rounds_dir),
                                                  log_name="dashboard-round.log")
        log.info("operator %r started a round (pid %d, log %s)", actor, rt.round_process.pid, log_path)
        return f"▶️ Round started by `{actor}` (pid {rt.round_process.pid}); its log: `{log_path}`."

    @admin
    async def on_rollback(actor: str):
        try:
            live = await rt.require().rollback(actor=actor)
        except Exception as exc:
            raise show_error(exc) from exc
        return f"↩️ Rolled back: `{live}` is live again."

    outputs = [panel, summary, feedback_plot, thumbs_plot, win_plot, report_pick, rounds, versions, candidate, board]
    report_pick.select(show_report, [password, report_pick], [report_md, report_plots], api_name="round_report")
    unlock.click(refresh_data, [password], outputs, api_name="dashboard")
    refresh.click(refresh_data, [password], outputs, api_name=False)
    promote.click(on_promote, [password, candidate], [action], api_name="promote").then(
        refresh_data, [password], outputs, api_name=False)
    rollback.click(on_rollback, [password], [action], api_name="rollback").then(
        refresh_data, [password], outputs, api_name=False)
    start_round.click(on_start_round, [password], [action], api_name="start_round").then(
        refresh_data, [password], outputs, api_name=False)
