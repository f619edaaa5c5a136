"""Starting `alignloop round` in the background: what `alignloop demo` and the dashboard's "Start a round" share.

The round runs as its own process (`python -m chat_app.cli round`), so its training never holds the
server's event loop or GIL; it writes to the same database, and the running server follows the
registry when the round registers a candidate.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def start_round(db_path: Path, base_model: str, rounds_dir: Path, *, settings: list[str] | None = None,
                log_name: str = "round.log") -> tuple[subprocess.Popen, Path]:
    """Start one round on `db_path` in the background; return (the process, its log file in `rounds_dir`)."""
    rounds_dir = Path(rounds_dir).expanduser()
    rounds_dir.mkdir(parents=True, exist_ok=True)
    log_path = rounds_dir / log_name
    cmd = [sys.executable, "-m", "chat_app.cli", "round", "--db", str(db_path), "--base-model", base_model,
           "--rounds-dir", str(rounds_dir)]
    for item in settings or []:
        cmd += ["--set", item]
    with log_path.open("a") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return process, log_path
