"""The model registry: which adapter versions exist, which one is live, and their history.

Live is a status on `model_versions` (at most one live version per kind, enforced by a
partial unique index), changed only inside one transaction together with an entry in
`registry_log`. Every change reads the rows it depends on inside its write transaction, so
concurrent promotes, rollbacks, retirements and metric updates (threads or processes) neither
lose an update nor leave a kind without its live version. Rollback replays that
log as a stack (promote pushes, rollback pops), so repeated rollbacks walk back in time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from .errors import InvalidInputError, NotFoundError, RegistryError
from .schema import utc_now
from .store import FeedbackStore

KINDS = ("policy", "reward", "external")
STATUSES = ("candidate", "live", "retired")


@dataclass
class ModelVersion:
    """One registered model version: an adapter folder on a base model (or the bare base)."""

    id: int
    name: str
    kind: str
    adapter_path: str | None
    base_model: str | None
    parent_id: int | None
    round_id: int | None
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    promoted_at: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> ModelVersion:
        row = dict(row)
        row["metrics"] = json.loads(row["metrics"]) if row.get("metrics") else {}
        return cls(**row)


@dataclass
class TrainingRound:
    """One retraining round: its configuration, data snapshot, status and metrics."""

    id: int
    status: str
    config: dict[str, Any]
    snapshot_event_id: int | None
    started_at: str
    finished_at: str | None
    metrics: dict[str, Any]
    report_path: str | None

    @classmethod
    def from_row(cls, row: dict) -> TrainingRound:
        row = dict(row)
        row["config"] = json.loads(row["config"]) if row.get("config") else {}
        row["metrics"] = json.loads(row["metrics"]) if row.get("metrics") else {}
        return cls(**row)


class ModelRegistry:
    """Register, promote, roll back and list model versions; record training rounds."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    # -- reading ----------------------------------------------------------------------
    def get(self, version: int | str) -> ModelVersion:
        """A version by id or name."""
        return self._get(self.store.db, version)

    @staticmethod
    def _get(db: sqlite_utils.Database, version: int | str) -> ModelVersion:
        column = "id" if isinstance(version, int) else "name"
        rows = list(db.query(f"SELECT * FROM model_versions WHERE {column} = ?", [version]))
        if not rows:
            raise NotFoundError(f"no model version {version!r}; see `alignloop db versions` for the list.")
        return ModelVersion.from_row(rows[0])

    def list(self, kind: str | None = None, status: str | None = None) -> list[ModelVersion]:
        """Versions, oldest first, optionally of one kind and/or status."""
        where, params = [], []
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if status:
            where.append("status = ?")
            params.append(status)
        sql = "SELECT * FROM model_versions" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [ModelVersion.from_row(r) for r in self.store.db.query(sql, params)]

    def live(self, kind: str = "policy") -> ModelVersion | None:
        """The live version of `kind`, or None before anything was promoted."""
        rows = list(self.store.db.query("SELECT * FROM model_versions WHERE kind = ? AND status = 'live'", [kind]))
        return ModelVersion.from_row(rows[0]) if rows else None

    def candidates(self, kind: str = "policy") -> list[ModelVersion]:
        """Versions waiting for promotion, newest first."""
        return list(reversed(self.list(kind, "candidate")))

    def history(self, kind: str = "policy") -> list[dict]:
        """The registry log of `kind`, oldest first."""
        return list(self.store.db.query("SELECT * FROM registry_log WHERE kind = ? ORDER BY id", [kind]))

    # -- writing ----------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        kind: str = "policy",
        adapter_path: str | Path | None = None,
        base_model: str | None = None,
        parent_id: int | None = None,
        round_id: int | None = None,
        metrics: dict[str, Any] | None = None,
        actor: str = "system",
    ) -> ModelVersion:
        """Add a version as a candidate. Names are unique and never reused (they key engine caches)."""
        if kind not in KINDS:
            raise InvalidInputError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}.")
        if not name or len(name) > 200:
            raise InvalidInputError("a model version needs a name of 1 to 200 characters.")
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM model_versions WHERE name = ?", [name]).fetchone():
                raise RegistryError(f"a model version named {name!r} exists already; names are never reused, pick another.")
            version_id = db["model_versions"].insert(
                {
                    "name": name,
                    "kind": kind,
                    "adapter_path": str(adapter_path) if adapter_path is not None else None,
                    "base_model": base_model,
                    "parent_id": parent_id,
                    "round_id": round_id,
                    "status": "candidate",
                    "metrics": json.dumps(metrics or {}, sort_keys=True),
                    "created_at": utc_now(),
                }
            ).last_pk
            self._log(db, kind, "register", version_id, None, actor)
        return self.get(version_id)

    def ensure_version(self, name: str, **kwargs: Any) -> ModelVersion:
        """The version called `name`, registered first if it does not exist."""
        try:
            return self.get(name)
        except NotFoundError:
            try:
                return self.register(name, **kwargs)
            except RegistryError:  # another process registered it meanwhile
                return self.get(name)

    def ensure_base_policy(self, base_model: str) -> ModelVersion:
        """The bare base model as a policy version; it goes live if no policy is live yet."""
        version = self.ensure_version(f"base:{base_model}", kind="policy", base_model=base_model)
        if self.live("policy") is None:
            try:
                version = self.promote(version.id, actor="system")
            except RegistryError:
                version = self.get(version.id)
        return version

    def promote(self, version: int | str, *, actor: str = "operator") -> ModelVersion:
        """Make `version` live for its kind, atomically retiring the previous live one."""
        with self.store.transaction() as db:
            target = self._get(db, version)
            if target.status == "live":
                raise RegistryError(f"{target.name} is already live.")
            if target.kind == "external":
                raise RegistryError(f"{target.name} is an external source of imported replies; it cannot be served.")
            previous = self._live_id(db, target.kind)
            if previous is not None:
                db["model_versions"].update(previous, {"status": "retired"})
            db["model_versions"].update(target.id, {"status": "live", "promoted_at": utc_now()})
            self._log(db, target.kind, "promote", target.id, previous, actor)
        return self.get(target.id)

    def rollback(self, kind: str = "policy", *, actor: str = "operator") -> ModelVersion:
        """Return to the version that was live before the current one; return it."""
        with self.store.transaction() as db:
            stack = self._live_stack(db, kind)
            if len(stack) < 2:
                raise RegistryError(f"there is no earlier live {kind} version to roll back to.")
            current, previous = stack[-1], stack[-2]
            db["model_versions"].update(current, {"status": "retired"})
            db["model_versions"].update(previous, {"status": "live", "promoted_at": utc_now()})
            self._log(db, kind, "rollback", previous, current, actor)
        return self.get(previous)

    def retire(self, version: int | str, *, actor: str = "operator") -> ModelVersion:
        """Take a candidate out of service (a live version is replaced by promote or rollback instead)."""
        with self.store.transaction() as db:
            target = self._get(db, version)
            if target.status == "live":
                raise RegistryError(f"{target.name} is live; promote another version or roll back instead.")
            db["model_versions"].update(target.id, {"status": "retired"})
            self._log(db, target.kind, "retire", target.id, None, actor)
        return self.get(target.id)

    def update_metrics(self, version: int | str, metrics: dict[str, Any]) -> ModelVersion:
        """Merge `metrics` into a version's stored metrics (read and written in one transaction,
        so concurrent updates of different keys all land)."""
        with self.store.transaction() as db:
            target = self._get(db, version)
            merged = {**target.metrics, **metrics}
            db["model_versions"].update(target.id, {"metrics": json.dumps(merged, sort_keys=True)})
        return self.get(target.id)

    @staticmethod
    def _live_id(db: sqlite_utils.Database, kind: str) -> int | None:
        row = db.execute("SELECT id FROM model_versions WHERE kind = ? AND status = 'live'", [kind]).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _live_stack(db: sqlite_utils.Database, kind: str) -> list[int]:
        stack: list[int] = []
        for row in db.query(
            "SELECT action, version_id FROM registry_log WHERE kind = ? AND action IN ('promote', 'rollback') ORDER BY id",
            [kind],
        ):
            if row["action"] == "promote":
                stack.append(row["version_id"])
            elif stack:
                stack.pop()
        return stack

    @staticmethod
    def _log(db: sqlite_utils.Database, kind: str, action: str, version_id: int | None,
             previous_id: int | None, actor: str) -> None:
        db["registry_log"].insert(
            {"kind": kind, "action": action, "version_id": version_id, "previous_version_id": previous_id,
             "actor": actor, "at": utc_now()}
        )

    # -- training rounds --------------------------------------------------------------
    def start_round(self, config: dict[str, Any], snapshot_event_id: int | None = None) -> TrainingRound:
        """Record a round as running, with its configuration and the snapshot it trains on."""
        with self.store.transaction() as db:
            round_id = db["training_rounds"].insert(
                {
                    "status": "running",
                    "config": json.dumps(config, sort_keys=True, default=str),
                    "snapshot_event_id": snapshot_event_id,
                    "started_at": utc_now(),
                    "metrics": "{}",
                }
            ).last_pk
        return self.get_round(round_id)

    def finish_round(self, round_id: int, status: str, *, metrics: dict[str, Any] | None = None,
                     report_path: str | Path | None = None) -> TrainingRound:
        """Close a round as succeeded, failed or stopped, with its metrics and report."""
        if status not in ("succeeded", "failed", "stopped"):
            raise InvalidInputError(f"a round finishes as succeeded, failed or stopped, not {status!r}.")
        with self.store.transaction() as db:
            current = self._get_round(db, round_id)
            db["training_rounds"].update(
                round_id,
                {
                    "status": status,
                    "finished_at": utc_now(),
                    "metrics": json.dumps({**{k: v for k, v in current.metrics.items() if k != "progress"},
                                           **(metrics or {})}, sort_keys=True, default=str),
                    "report_path": str(report_path) if report_path else current.report_path,
                },
            )
        return self.get_round(round_id)

    def record_progress(self, round_id: int, progress: dict[str, Any]) -> None:
        """Note where a running round is (its metrics' "progress": step, done, total, seconds left), for
        the app's banner and dashboard. Ignored once the round has finished."""
        with self.store.transaction() as db:
            current = self._get_round(db, round_id)
            if current.status == "running":
                db["training_rounds"].update(round_id, {"metrics": json.dumps(
                    {**current.metrics, "progress": {**progress, "at": utc_now()}}, sort_keys=True, default=str)})

    def running_round(self) -> TrainingRound | None:
        """The newest round still marked running, if any (a round whose process died stays "running":
        look at its progress' "at" before trusting it)."""
        rows = list(self.store.db.query("SELECT * FROM training_rounds WHERE status = 'running' ORDER BY id DESC LIMIT 1"))
        return TrainingRound.from_row(rows[0]) if rows else None

    def get_round(self, round_id: int) -> TrainingRound:
        """One training round by id."""
        return self._get_round(self.store.db, round_id)

    @staticmethod
    def _get_round(db: sqlite_utils.Database, round_id: int) -> TrainingRound:
        rows = list(db.query("SELECT * FROM training_rounds WHERE id = ?", [round_id]))
        if not rows:
            raise NotFoundError(f"no training round {round_id}.")
        return TrainingRound.from_row(rows[0])

    def rounds(self) -> list[TrainingRound]:
        """All rounds, oldest first."""
        return [TrainingRound.from_row(r) for r in self.store.db.query("SELECT * FROM training_rounds ORDER BY id")]
