"""ServingRouter: which model version answers a request, and hot-swapping them without a restart.

The registry in feedback_db is the source of truth for the live and candidate policy
versions. The router polls it, is poked directly after a promotion in this process, and looks
again before routing each request (switching at once to a version it already holds, and
waiting briefly for a promoted version it must load first), makes a new version's adapter
available in the engine *before* routing to it, and pins every request to the version it
started on with a lease. A version that is no longer
live or candidate is released from the engine once no request holds it and it has been
idle for a while. A version whose adapter fails to load is never routed to; the error is
kept for the dashboard and the previous version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from feedback_db import FeedbackStore, ModelRegistry, ModelVersion

from .engines.base import AdapterRef, Engine

log = logging.getLogger(__name__)

Arm = Literal["live", "candidate"]


@dataclass
class RouterConfig:
    """How the router follows the registry."""

    poll_interval_s: float = 0.25  # a promotion elsewhere is picked up within about this long
    release_idle_after_s: float = 10.0  # an old adapter is released after this long with no request
    # A request routed right after a promotion waits up to this long for the promoted version's adapter
    # to load (it then gets the new version); past it, the request is served by the old live version.
    promotion_wait_s: float = 2.0


@dataclass(frozen=True)
class ServedVersion:
    """A model version as the engine serves it."""

    version_id: int
    name: str
    adapter: str | None  # the engine's adapter name; None: the bare base model

    @classmethod
    def of(cls, v: ModelVersion) -> ServedVersion:
        return cls(v.id, v.name, v.name if v.adapter_path else None)


@dataclass
class _Slot:
    served: ServedVersion
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ServingRouter:
    """Routes requests to the live or candidate policy and follows the registry live."""

    def __init__(self, engine: Engine, store: FeedbackStore, base_model: str,
                 config: RouterConfig | None = None) -> None:
        self.engine = engine
        self.store = store
        self.registry = ModelRegistry(store)
        self.base_model = base_model
        self.config = config or RouterConfig()
        self.live: ServedVersion | None = None
        self.candidate: ServedVersion | None = None
        self.load_errors: dict[str, str] = {}  # version name -> why it could not be served
        self._slots: dict[str, _Slot] = {}  # loaded versions by name
        self._sync_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._pending_sync: asyncio.Task | None = None  # a sync started for a request after a promotion
        self._pending_since = 0.0

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Register the bare base model (live if nothing else is), sync, and start polling."""
        await asyncio.to_thread(self.registry.ensure_base_policy, self.base_model)
        await self.sync()
        self._poller = asyncio.create_task(self._poll(), name="alignloop-registry-poll")

    async def stop(self) -> None:
        for task in (self._poller, self._pending_sync):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # keep serving what we have; the next poll retries
                log.exception("registry sync failed")

    # -- following the registry -------------------------------------------------------
    async def sync(self) -> None:
        """Make the registry's live and newest candidate versions servable, then switch to them."""
        async with self._sync_lock:
            await self._follow(load=True)
            await self._release_idle()

    async def refresh(self) -> None:
        """Switch now to what the registry says is live and candidate, before a request is routed.

        So a request sent right after a promotion by any process (the CLI, another server) gets the new
        version instead of waiting for the next poll. A version the engine already holds (a preloaded
        candidate) is switched to at once. A promoted live version it does not hold yet is loaded by one
        sync that concurrent requests share, and the request waits for it up to
        `RouterConfig.promotion_wait_s`: past that (a slow or broken adapter), the request is served by the
        old live version and the load goes on in the background. A new candidate is never loaded on a
        request's path: the poller does that.
        """
        if not self._sync_lock.locked():
            async with self._sync_lock:
                missing = await self._follow(load=False)
        else:  # a sync in progress switches when it is done; wait for it only if it has the live version to load
            live, _ = await asyncio.to_thread(self._read_registry)
            missing = self._must_load(live)
        if missing:
            await self._wait_for_sync()  # that sync switches to it once loaded

    async def _wait_for_sync(self) -> None:
        """Wait for one shared sync that loads what the registry names, until promotion_wait_s after it
        began: requests that come later while a slow load goes on do not wait again."""
        if self._pending_sync is None or self._pending_sync.done():
            self._pending_sync = asyncio.create_task(self.sync(), name="alignloop-promotion-sync")
            self._pending_since = time.monotonic()
        left = self.config.promotion_wait_s - (time.monotonic() - self._pending_since)
        try:
            await asyncio.wait_for(asyncio.shield(self._pending_sync), max(0.0, left))
        except TimeoutError:
            if left > 0:
                log.warning("the promoted version is still loading after %.1f s; requests get the old one "
                            "until it is ready", self.config.promotion_wait_s)
        except Exception:  # sync failed: the request keeps the old version; the poller retries
            log.exception("registry sync failed")

    def _must_load(self, live: ModelVersion | None) -> bool:
        """Whether the registry's live version needs loading before it can serve (and may load)."""
        return live is not None and live.name not in self._slots and live.name not in self.load_errors

    async def _follow(self, *, load: bool) -> bool:
        """Switch to the registry's live and candidate versions (loading them first if `load`); True when
        the live version could not be switched to because it is not loaded yet."""
        # Registry reads run off the event loop: a writer holding the database must not stall streams.
        live, candidates = await asyncio.to_thread(self._read_registry)
        candidate = next((c for c in candidates if c.name not in self.load_errors), None)
        if live is not None and await self._servable(live, load):
            if self.live is None or self.live.name != live.name:
                log.info("live: %s (was %s)", live.name, self.live.name if self.live else "none")
            self.live = ServedVersion.of(live)
        if candidate is None:
            self.candidate = None
        elif await self._servable(candidate, load):
            self.candidate = ServedVersion.of(candidate)
        return self._must_load(live)

    async def _servable(self, version: ModelVersion, load: bool) -> bool:
        return await self._ensure_loaded(version) if load else version.name in self._slots

    def _read_registry(self) -> tuple[ModelVersion | None, list[ModelVersion]]:
        candidates = [c for c in self.registry.candidates("policy") if c.base_model in (None, self.base_model)]
        return self.registry.live("policy"), candidates

    async def prepare(self, version: ModelVersion) -> str | None:
        """Load `version` into the engine now (retrying one that failed before); None when it is servable,
        else why not. An operator's promote calls this first, so a broken adapter is never made live."""
        async with self._sync_lock:
            self.load_errors.pop(version.name, None)
            return None if await self._ensure_loaded(version) else self.load_errors.get(version.name, "unknown error")

    async def _ensure_loaded(self, version: ModelVersion) -> bool:
        if version.name in self._slots:
            return True
        if version.name in self.load_errors:
            return False
        if version.adapter_path:
            try:
                await self.engine.add_adapter(AdapterRef(version.name, Path(version.adapter_path)))
            except Exception as exc:
                self.load_errors[version.name] = str(exc)
                log.error("cannot serve %s: %s", version.name, exc)
                return False
        self._slots[version.name] = _Slot(ServedVersion.of(version))
        log.info("serving %s (%s)", version.name, version.adapter_path or "bare base model")
        return True

    async def _release_idle(self) -> None:
        keep = {v.name for v in (self.live, self.candidate) if v is not None}
        now = time.monotonic()
        for name, slot in list(self._slots.items()):
            idle = now - slot.last_used
            if name in keep or slot.leases > 0 or idle < self.config.release_idle_after_s:
                continue
            if slot.served.adapter is not None:
                await self.engine.remove_adapter(slot.served.adapter)
            del self._slots[name]
            log.info("released %s after %.0f s idle", name, idle)

    # -- routing ----------------------------------------------------------------------
    def pick(self, arm: Arm = "live") -> ServedVersion:
        """The version serving `arm` right now (candidate falls back to live when there is none)."""
        chosen = self.candidate if arm == "candidate" and self.candidate else self.live
        if chosen is None:
            raise RuntimeError("no live policy version; start the router first (ServingRouter.start).")
        return chosen

    def battle_pair(self, rng: random.Random | None = None) -> tuple[ServedVersion, ServedVersion]:
        """Two versions for a Compare battle, sides shuffled: live vs candidate, or live twice."""
        pair = [self.pick("live"), self.pick("candidate")]
        (rng or random).shuffle(pair)
        return pair[0], pair[1]

    @contextlib.asynccontextmanager
    async def lease(self, version: ServedVersion) -> AsyncIterator[ServedVersion]:
        """Pin `version` for the duration of a request: it is not released while held."""
        slot = self._slots.get(version.name)
        if slot is None:  # released between pick() and lease(): serve live instead
            version = self.pick("live")
            slot = self._slots[version.name]
        slot.leases += 1
        try:
            yield version
        finally:
            slot.leases -= 1
            slot.last_used = time.monotonic()

    def loaded(self) -> list[str]:
        """Names of the versions the engine currently holds."""
        return list(self._slots)
