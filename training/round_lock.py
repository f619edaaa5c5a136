"""The round lock and the registry's memory of earlier rounds: stale ones, and a repeat to skip.

One round at a time per rounds folder: ``round_lock`` holds ``<rounds_dir>/.round.lock`` with
flock, which the kernel releases when the process dies, so a killed round never blocks the next.
While holding it, ``recover_stale_rounds`` marks rounds left 'running' by a dead process as
failed and deletes their folders (nothing of theirs was registered: registration and the round's
success are one transaction).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class RoundBusyError(RuntimeError):
    """Another round holds the lock."""


def round_dir_name(round_id: int) -> str:
    """The folder of round ``round_id`` under the rounds folder, e.g. ``round-0007``."""
    return f"round-{round_id:04d}"


@contextmanager
def round_lock(rounds_dir: Path) -> Iterator[None]:
    """Hold ``<rounds_dir>/.round.lock`` (non-blocking); another holder raises RoundBusyError.

    flock is released by the kernel when the process dies, so a killed round never blocks the next.
    """
    rounds_dir.mkdir(parents=True, exist_ok=True)
    path = rounds_dir / ".round.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole round
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            raise RoundBusyError(
                f"another training round is running ({holder}; lock {path}). Wait for it to finish; "
                "a killed round releases the lock by itself, so no file needs deleting."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def recover_stale_rounds(registry: Any, rounds_dir: Path, *, current_round: int | None = None) -> list[int]:
    """Mark rounds left 'running' by a killed process as failed and delete their folders.

    Call only while holding the lock: then no round of this ``rounds_dir`` can really be running.
    Nothing of theirs is registered (registration and the round's success are one transaction).
    """
    recovered = []
    for r in registry.rounds():
        if r.status != "running" or r.id == current_round:
            continue
        if Path(str(r.config.get("rounds_dir", rounds_dir))).expanduser() != rounds_dir:
            continue  # another rounds folder has its own lock; not ours to judge
        registry.finish_round(r.id, "failed", metrics={
            "error": "interrupted: the process stopped before the round finished; nothing was registered."})
        shutil.rmtree(rounds_dir / round_dir_name(r.id), ignore_errors=True)
        recovered.append(r.id)
    return recovered


def same_round_done(registry: Any, config: dict[str, Any], snapshot: int) -> Any | None:
    """The last round, if it ran on this very snapshot and configuration (``RoundConfig.to_dict()``) and
    ended on its own (succeeded, or stopped by a gate or too little data; not interrupted): rerunning
    would repeat it."""
    done = [r for r in registry.rounds() if r.status in ("succeeded", "stopped")]
    if not done:
        return None
    last = done[-1]
    if last.snapshot_event_id != snapshot or "error" in last.metrics or last.config != config:
        return None
    return last
