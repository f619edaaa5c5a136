"""ChatService: what the UI does, without the UI.

Every handler of the Gradio app is a thin wrapper over a method here, so the logic is
tested directly and through gradio_client alike. The service talks to the engine only
through the router (which pins each request to one model version) and to the database
only through feedback_db.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from feedback_db import FeedbackError, FeedbackStore, ModelRegistry, PromotionPolicy, Reply, auto_promote_candidate

from .engines.base import Engine, Messages, ReplyChunk, SamplingConfig
from .limits import RateLimiter, UserFacingError
from .router import ServedVersion, ServingRouter

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    """Limits and defaults of the chat service."""

    max_input_chars: int = 4_000  # longest user message accepted
    rate_limit_per_minute: int = 30  # generation requests per user per minute (0: off)
    default_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rank_k_default: int = 4
    # Promote a gated candidate once its Compare votes pass this sequential test (None: never from the server).
    auto_promote: PromotionPolicy | None = None


@dataclass
class StreamUpdate:
    """One step of a streamed reply, plus the ids once they exist."""

    text: str
    conversation_id: int
    user_message_id: int
    reply_id: int | None = None  # set on the final update, once stored
    finished: bool = False
    error: str | None = None


@dataclass
class Battle:
    """A Compare round: two replies to one prompt from two (anonymous) versions."""

    conversation_id: int
    user_message_id: int
    reply_ids: list[int]
    texts: list[str]
    versions: list[str]  # revealed after the vote
    done: bool = False


def storable(model_text: str) -> str:
    """Model output as the store accepts it: a model can emit NUL, which is not valid text there."""
    return model_text.replace("\x00", "\ufffd")


def engine_failure_message(exc: BaseException) -> str:
    """What the user sees when the engine fails: specific, with what to do next."""
    return (f"⚠️ The model could not answer ({type(exc).__name__}: {exc}). "
            "Your message was saved; press Regenerate to try again. If it keeps failing, "
            "an operator should check the server log.")


class ChatService:
    """Conversations, streaming replies, feedback, Compare battles, rankings, operator actions."""

    def __init__(self, store: FeedbackStore, router: ServingRouter, config: ServiceConfig | None = None) -> None:
        self.store = store
        self.router = router
        self.engine: Engine = router.engine
        self.registry = ModelRegistry(store)
        self.config = config or ServiceConfig()
        self.limiter = RateLimiter(self.config.rate_limit_per_minute)
        self._known_users: set[str] = set()
        # Battles by the id of their prompt message: the UI keeps only this key, so a vote
        # never depends on which streamed update reached the browser last.
        self._battles: dict[int, Battle] = {}

    def ensure_user(self, user_id: str, *, is_admin: bool = False) -> str:
        """Make sure the user exists in the store (cached: one write per user per process)."""
        if user_id not in self._known_users or is_admin:
            self.store.ensure_user(user_id, is_admin=is_admin)
            self._known_users.add(user_id)
        return user_id

    # -- input checks -----------------------------------------------------------------
    def _check_request(self, user_id: str, text: str) -> str:
        if not text or not text.strip():
            raise UserFacingError("Write a message first.")
        if len(text) > self.config.max_input_chars:
            raise UserFacingError(
                f"Your message is {len(text):,} characters; the limit is {self.config.max_input_chars:,}. "
                "Please shorten it."
            )
        self.limiter.check(user_id)
        return text

    # -- chat -------------------------------------------------------------------------
    async def _stream_reply(self, user_id: str, conversation_id: int, user_message_id: int,
                            version: ServedVersion, sampling: SamplingConfig) -> AsyncIterator[StreamUpdate]:
        """Stream one reply to `user_message_id` from `version` and store it (even if stopped)."""
        messages = self.store.context(user_message_id).as_chat()
        text, last = "", None
        start = time.perf_counter()
        finish_reason = "abort"
        async with self.router.lease(version) as served:
            error = None
            try:
                async for chunk in self.engine.stream(messages, adapter=served.adapter, sampling=sampling):
                    text, last = chunk.text, chunk
                    if chunk.finished:
                        finish_reason = chunk.finish_reason or "stop"
                    else:
                        yield StreamUpdate(text, conversation_id, user_message_id)
            except (GeneratorExit, asyncio.CancelledError):
                # The user pressed Stop (the generator was closed): the cut-off reply is kept so the
                # conversation shows it; it cannot be voted on (feedback_db.UNVOTABLE_FINISH_REASONS).
                self._store_reply(user_id, conversation_id, user_message_id, served, text, sampling, start, last,
                                  "abort")
                raise
            except Exception as exc:
                log.exception("engine failed on %s", served.name)
                finish_reason, error = "error", engine_failure_message(exc)
            reply_id = self._store_reply(user_id, conversation_id, user_message_id, served, text, sampling,
                                         start, last, finish_reason)
        yield StreamUpdate(text, conversation_id, user_message_id, reply_id=reply_id, finished=True, error=error)

    def _store_reply(self, user_id: str, conversation_id: int, parent_id: int, served: ServedVersion, text: str,
                     sampling: SamplingConfig, start: float, last: ReplyChunk | None, finish_reason: str) -> int:
        return self.store.add_reply(
            conversation_id, user_id, parent_id, storable(text),
            Reply(
                model_version_id=served.version_id,
                sampling=sampling.as_dict(),
                latency_ms=round((time.perf_counter() - start) * 1000, 1),
                prompt_tokens=last.prompt_tokens if last else None,
                completion_tokens=last.completion_tokens if last else None,
                finish_reason=finish_reason,
            ),
        )

    async def chat(self, user_id: str, text: str, *, conversation_id: int | None = None, parent_id: int | None = None,
                   system_prompt: str | None = None, sampling: SamplingConfig | None = None,
                   client_id: str | None = None) -> AsyncIterator[StreamUpdate]:
        """Add a user turn (a new conversation when `conversation_id` is None) and stream the live reply."""
        self._check_request(user_id, text)
        if conversation_id is None:
            conversation_id = self.store.create_conversation(user_id, system_prompt=system_prompt,
                                                             title=text.strip()[:80])
        user_message_id = self.store.add_user_message(conversation_id, user_id, text, parent_id=parent_id,
                                                      client_id=client_id)
        async for update in self._stream_reply(user_id, conversation_id, user_message_id, self.router.pick("live"),
                                               sampling or self.config.default_sampling):
            yield update

    async def regenerate(self, user_id: str, user_message_id: int, *,
                         sampling: SamplingConfig | None = None) -> AsyncIterator[StreamUpdate]:
        """Another reply to the same user turn: stored as a sibling of the earlier ones."""
        self.limiter.check(user_id)
        try:
            msg = self.store.message(user_message_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        if msg["user_id"] != user_id or msg["role"] != "user":
            raise UserFacingError("That message cannot be regenerated.")
        async for update in self._stream_reply(user_id, msg["conversation_id"], user_message_id,
                                               self.router.pick("live"), sampling or self.config.default_sampling):
            yield update

    # -- feedback ---------------------------------------------------------------------
    def rate(self, user_id: str, reply_id: int, value: int, *, reasons: list[str] | None = None,
             comment: str | None = None, client_id: str | None = None) -> int:
        try:
            return self.store.record_rating(user_id, reply_id, value, reasons=reasons, comment=comment or None,
                                            client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc

    def demonstrate(self, user_id: str, user_message_id: int, text: str, *, replaces_reply_id: int | None = None,
                    client_id: str | None = None) -> int:
        try:
            return self.store.record_demonstration(user_id, user_message_id, text,
                                                   replaces_message_id=replaces_reply_id, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc

    # -- compare ----------------------------------------------------------------------
    async def battle(self, user_id: str, text: str, *, system_prompt: str | None = None,
                     sampling: SamplingConfig | None = None, rng: random.Random | None = None,
                     ) -> AsyncIterator[Battle]:
        """Stream two replies side by side: live vs candidate (or two samples of live), sides shuffled."""
        self._check_request(user_id, text)
        sampling = sampling or self.config.default_sampling
        left, right = self.router.battle_pair(rng)
        conv = self.store.create_conversation(user_id, system_prompt=system_prompt, source="compare",
                                              title=text.strip()[:80])
        q = self.store.add_user_message(conv, user_id, text)
        battle = Battle(conv, q, [0, 0], ["", ""], [left.name, right.name])
        self._battles[q] = battle
        while len(self._battles) > 10_000:  # forget the oldest unvoted battles
            self._battles.pop(next(iter(self._battles)))
        queue: asyncio.Queue[tuple[int, StreamUpdate | None]] = asyncio.Queue()

        async def run(side: int, version: ServedVersion) -> None:
            # Distinct seeds so two samples of the same version differ.
            side_sampling = replace(sampling, seed=None if sampling.seed is None else sampling.seed + side)
            try:
                async for update in self._stream_reply(user_id, conv, q, version, side_sampling):
                    await queue.put((side, update))
            finally:
                await queue.put((side, None))

        tasks = [asyncio.create_task(run(i, v)) for i, v in enumerate((left, right))]
        try:
            finished = 0
            while finished < 2:
                side, update = await queue.get()
                if update is None:
                    finished += 1
                    continue
                battle.texts[side] = update.error or update.text
                if update.reply_id is not None:
                    battle.reply_ids[side] = update.reply_id
                yield battle
            battle.done = True
            yield battle
        finally:
            for t in tasks:
                t.cancel()

    def get_battle(self, key: int) -> Battle:
        """A battle started in this process, by the id of its prompt message."""
        battle = self._battles.get(key)
        if battle is None:
            raise UserFacingError("That comparison has expired; start a new one.")
        return battle

    def vote(self, user_id: str, battle: Battle | int, choice: str, *, client_id: str | None = None) -> list[str]:
        """Record the Compare vote; return the two version names (revealed after the vote)."""
        if isinstance(battle, int):
            battle = self.get_battle(battle)
        if not battle.done or 0 in battle.reply_ids:
            raise UserFacingError("Wait until both replies have finished, then vote.")
        try:
            self.store.record_comparison(user_id, battle.reply_ids[0], battle.reply_ids[1], choice, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self._battles.pop(battle.user_message_id, None)
        if self.config.auto_promote is not None:
            promoted = auto_promote_candidate(self.store, self.router.base_model, policy=self.config.auto_promote)
            if promoted:  # the router's next registry poll (≤ 0.25 s) switches to it
                log.info("auto-promoted %s after Compare votes", promoted)
        return battle.versions

    # -- rank -------------------------------------------------------------------------
    async def rank_candidates(self, user_id: str, text: str, k: int, *, system_prompt: str | None = None,
                              sampling: SamplingConfig | None = None) -> tuple[int, list[int], list[str]]:
        """K replies from the live version to one prompt, stored as siblings; returns (prompt id, ids, texts)."""
        if not 2 <= k <= 9:
            raise UserFacingError("Choose between 2 and 9 replies to rank.")
        self._check_request(user_id, text)
        sampling = sampling or self.config.default_sampling
        conv = self.store.create_conversation(user_id, system_prompt=system_prompt, source="rank",
                                              title=text.strip()[:80])
        q = self.store.add_user_message(conv, user_id, text)
        messages: Messages = self.store.context(q).as_chat()
        version = self.router.pick("live")
        start = time.perf_counter()
        async with self.router.lease(version) as served:
            try:
                completions = await self.engine.generate(messages, k, adapter=served.adapter, sampling=sampling)
            except Exception as exc:
                log.exception("engine failed on %s", served.name)
                raise UserFacingError(engine_failure_message(exc)) from exc
        latency = round((time.perf_counter() - start) * 1000, 1)
        ids = [
            self.store.add_reply(conv, user_id, q, storable(c.text), Reply(served.version_id, sampling.as_dict(), latency,
                                                                  c.prompt_tokens, c.completion_tokens,
                                                                  c.finish_reason))
            for c in completions
        ]
        return q, ids, [c.text for c in completions]

    def submit_ranking(self, user_id: str, ranked_reply_ids: list[int], *, client_id: str | None = None) -> int:
        try:
            return self.store.record_ranking(user_id, ranked_reply_ids, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc

    # -- operators --------------------------------------------------------------------
    async def promote(self, version: int | str, *, actor: str) -> str:
        """Make a version live now; the router switches before this returns."""
        try:
            promoted = self.registry.promote(version, actor=actor)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        await self.router.sync()
        return promoted.name

    async def rollback(self, *, actor: str) -> str:
        """Return to the previous live version now."""
        try:
            restored = self.registry.rollback("policy", actor=actor)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        await self.router.sync()
        return restored.name
