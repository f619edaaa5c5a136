"""The `alignloop` command: one sub-command group per package, each mirroring its Python API."""

from __future__ import annotations

import typer

from feedback_db.cli import app as db_app
from training.cli import models_app

app = typer.Typer(
    help="alignloop: serve an aligned LM, collect feedback, retrain, hot-swap.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
