"""`alignloop db ...`: the feedback store from the shell, over the same functions as the Python API."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .connection import default_db_path
from .errors import FeedbackError, for_operator
from .exports import export, write_jsonl
from .imports import import_jsonl
from .leaderboard import leaderboard
from .registry import ModelRegistry
from .store import FeedbackStore

app = typer.Typer(help="The feedback database: create, inspect, export and import.", no_args_is_help=True)

DbOption = typer.Option(
    None, "--db", help="SQLite file (default: $ALIGNLOOP_DB or ~/.local/share/alignloop/feedback.db).",
    show_default=False,
)


def _open(db: Optional[Path], *, create: bool = False) -> FeedbackStore:
    try:
        return FeedbackStore(db or default_db_path(), create=create)
    except FeedbackError as exc:
        _fail(exc)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {for_operator(exc)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def init(db: Optional[Path] = DbOption) -> None:
    """Create the database (or migrate it to the latest schema).

    Example: alignloop db init --db feedback.db
    """
    with _open(db, create=True) as store:
        typer.echo(f"{store.path}: schema version {store.schema_version}")


@app.command()
def stats(db: Optional[Path] = DbOption, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Counts of everything recorded, thumbs per model version, live versions.

    Example: alignloop db stats --db feedback.db --json
    """
    with _open(db) as store:
        s = store.stats()
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    typer.echo(f"{s['path']}  (schema v{s['schema_version']}, snapshot {s['snapshot']})")
    for table, n in s["counts"].items():
        typer.echo(f"  {table:<16}{n:>10,}")
    if s["live"]:
        typer.echo("live: " + ", ".join(f"{k}={v}" for k, v in s["live"].items()))
    for row in s["thumbs_by_version"]:
        typer.echo(f"  {row['model_version']}: {row['thumbs_up']} up / {row['thumbs_down']} down")
    if s["comparison_choices"]:
        typer.echo("comparisons: " + ", ".join(f"{k}={v}" for k, v in s["comparison_choices"].items()))


@app.command("export")
def export_cmd(
    kind: str = typer.Option(..., "--kind", help="sft | preferences | thumbs (unpaired 👍/👎, KTO rows) | prompts"),
    fmt: str = typer.Option("trl", "--format", help="trl (prompt/chosen/rejected, messages) | groups (preferences per prompt)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .jsonl (default: stdout)."),
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="Last event id to include (default: latest)."),
    no_thumbs: bool = typer.Option(False, "--no-thumbs", help="Leave thumbs out (pairs from up/down; SFT from liked replies)."),
    db: Optional[Path] = DbOption,
) -> None:
    """Export training data as JSONL, reproducible from a snapshot.

    Prints to stderr how many rows were kept and how many votes were dropped, by reason
    (identical texts, failed or stopped replies, superseded, outvoted, tied across users, ...).

    Example: alignloop db export --kind preferences --format trl -o prefs.jsonl
    """
    with _open(db) as store:
        try:
            result = export(store, kind, snapshot, fmt=fmt, include_thumbs=not no_thumbs)  # type: ignore[arg-type]
        except FeedbackError as exc:
            _fail(exc)
    if out is None:
        for row in result.rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        write_jsonl(result.rows, out)
    typer.echo(result.summary(kind) + (f" -> {out}" if out else ""), err=True)


@app.command("import")
def import_cmd(
    path: Path = typer.Argument(..., help="JSONL or JSONL.gz in TRL's format.", exists=True, dir_okay=False),
    kind: str = typer.Option(..., "--kind", help="preferences | sft | prompts"),
    source: Optional[str] = typer.Option(None, "--source", help="Name of the data source (default: file name)."),
    db: Optional[Path] = DbOption,
) -> None:
    """Import a dataset. Every row is checked first (a bad row: nothing written); rows then commit
    in batches, so the app keeps writing during a long import. Re-importing the same file adds
    nothing, so an interrupted import is completed by running it again.

    Example: alignloop db import --kind preferences hh_pairs.jsonl.gz
    """

    def progress(done: int, total: int) -> None:
        typer.echo(f"\r{done:,}/{total:,} rows imported", err=True, nl=done == total)

    with _open(db, create=True) as store:
        try:
            result = import_jsonl(store, path, kind, source=source, progress=progress)
        except FeedbackError as exc:
            _fail(exc)
    typer.echo(f"{result.rows} rows read, {result.new_records} new records (source {result.source!r})")


@app.command()
def versions(
    kind: Optional[str] = typer.Option(None, "--kind", help="policy | reward | external"),
    db: Optional[Path] = DbOption,
) -> None:
    """List registered model versions and their status.

    Example: alignloop db versions --kind policy
    """
    with _open(db) as store:
        for v in ModelRegistry(store).list(kind=kind):
            marker = "*" if v.status == "live" else " "
            typer.echo(f"{marker} {v.id:>4}  {v.name:<40} {v.kind:<8} {v.status:<9} {v.adapter_path or '-'}")


@app.command("leaderboard")
def leaderboard_cmd(
    bootstrap: int = typer.Option(200, "--bootstrap", help="Bootstrap resamples behind the 95% intervals (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    db: Optional[Path] = DbOption,
) -> None:
    """Every version ranked by its Compare votes: Bradley-Terry ratings (Elo scale) with 95% bootstrap
    intervals, as Chatbot Arena computes them; each user's latest vote on each pair counts once.

    Example: alignloop db leaderboard
    """
    with _open(db) as store:
        rows = leaderboard(store, bootstrap=bootstrap)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no counted Compare votes between two versions yet.")
        return
    typer.echo(f"{'rank':>4}  {'version':<32} {'rating':>7}  {'95% interval':<16} {'votes':>5} {'W/L/T':>11}")
    for r in rows:
        typer.echo(f"{r.rank:>4}  {r.name:<32} {r.rating:>7.0f}  [{r.ci_low:>5.0f}, {r.ci_high:>5.0f}]   "
                   f"{r.votes:>5} {f'{r.wins}/{r.losses}/{r.ties}':>11}")
