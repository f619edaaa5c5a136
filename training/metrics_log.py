"""Metrics to TensorBoard and to a JSON-lines file, one record per step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append ``{"step", "time", **metrics}`` to ``metrics.jsonl`` and, when tensorboard
    is installed, write the same scalars to a TensorBoard event file in ``folder``."""

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer: Any = SummaryWriter(str(self.folder / "tensorboard"))
            if config is not None:
                self._writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        except ImportError:  # tensorboard is a dependency, but logging must never stop a run
            self._writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalar metrics for ``step``."""
        clean = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in clean.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``folder/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]  # not splitlines: U+2028 in text
