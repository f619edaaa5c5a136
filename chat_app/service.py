"""ChatService: what the UI does, without the UI.

Every handler of the Gradio app is a thin wrapper over a method here, so the logic is
tested directly and through gradio_client alike. The service talks to the engine only
through the router (which pins each request to one model version) and to the database
only through feedback_db.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from feedback_db import FeedbackError, FeedbackStore, ModelRegistry, PromotionPolicy, Reply, auto_promote_candidate
from feedback_db.validation import clean_text

from .engines.base import Engine, EngineError, Messages, ReplyChunk, SamplingConfig
from .limits import LimitConfig, RequestLimits, UserFacingError
from .metrics import ServingMetrics
from .router import ServedVersion, ServingRouter

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    """Limits and defaults of the chat service."""

    max_input_chars: int = 4_000  # longest user message accepted
    max_system_prompt_chars: int = 4_000  # longest system prompt accepted
    limits: LimitConfig = field(default_factory=LimitConfig)  # per identity and per address, per minute
    store_threads: int = 4  # threads that run store calls, so that none blocks the event loop
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
    note: str | None = None  # e.g. that old turns were left out to fit the context window
    finish_reason: str | None = None  # final update: stop | length | error
    prompt_tokens: int | None = None  # final update: what the engine read and wrote
    completion_tokens: int | None = None


API_CLIENT_VERSION = "external:api-client"  # what wrote assistant turns an API client sent that no served version did


def _utc_seconds(stamp: str) -> float:
    """Seconds since the epoch of a store timestamp (ISO 8601, UTC); 0 if it cannot be read."""
    try:
        parsed = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def context_note(dropped: int) -> str | None:
    """What the user reads when old turns did not fit the model's context."""
    if not dropped:
        return None
    return (f"ℹ️ This conversation is longer than the model can read at once: the {dropped} oldest "
            f"message{'s were' if dropped > 1 else ' was'} left out of its context for this reply.")


@dataclass
class Battle:
    """A Compare round: two replies to one prompt from two (anonymous) versions."""

    conversation_id: int
    user_message_id: int
    reply_ids: list[int]
    texts: list[str]
    versions: list[str]  # revealed after the vote
    done: bool = False


@dataclass
class Ranking:
    """A Rank request: K replies to one prompt from the live version (reply ids are 0 until stored)."""

    conversation_id: int
    user_message_id: int
    reply_ids: list[int]
    texts: list[str]
    done: bool = False


def conversation_title(first_message: str) -> str:
    """A new conversation's title: its first message, trimmed, at most 80 characters."""
    return first_message.strip()[:80]


def storable(model_text: str) -> str:
    """Model output as the store accepts it: a model can emit NUL, which is not valid text there.
    Applied to what the user is sent as well, so what they see is what is stored and trained on."""
    return model_text.replace("\x00", "\ufffd")


def engine_failure_message(exc: BaseException) -> str:
    """What the user sees when the engine fails: specific, with what to do next."""
    return (f"⚠️ The model could not answer ({type(exc).__name__}: {exc}). "
            "Your message was saved; press Regenerate to try again. If it keeps failing, "
            "an operator should check the server log.")


class ChatService:
    """Conversations, streaming replies, feedback, Compare battles, rankings, operator actions.

    Every store call of an async method runs on the store's own threads (`_db`), never on the event
    loop: a slow write (another process importing, a lock wait) delays that request only. Sync
    methods are called by Gradio on its worker threads, where blocking is fine.
    """

    def __init__(self, store: FeedbackStore, router: ServingRouter, config: ServiceConfig | None = None) -> None:
        self.store = store
        self.router = router
        self.engine: Engine = router.engine
        self.registry = ModelRegistry(store)
        self.config = config or ServiceConfig()
        self.limits = RequestLimits(self.config.limits)
        self.metrics = ServingMetrics()
        self._known_users: set[str] = set()
        self._store_pool = ThreadPoolExecutor(max_workers=self.config.store_threads, thread_name_prefix="store")
        # Battles by the id of their prompt message: the UI keeps only this key, so a vote
        # never depends on which streamed update reached the browser last.
        self._battles: dict[int, Battle] = {}
        self._generating: set[int] = set()  # conversations with a reply streaming now
        self._status: tuple[float, dict[str, Any]] | None = None  # model_status's cache: (monotonic time, status)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call on the store's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._store_pool,
                                                                functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._store_pool.shutdown(wait=True)

    def ensure_user(self, user_id: str, *, is_admin: bool = False) -> str:
        """Make sure the user exists in the store (cached: one write per user per process)."""
        if user_id not in self._known_users or is_admin:
            self.store.ensure_user(user_id, is_admin=is_admin)
            self._known_users.add(user_id)
            while len(self._known_users) > 100_000:  # only a cache: forget an arbitrary one
                self._known_users.pop()
        return user_id

    # -- input checks -----------------------------------------------------------------
    def _check_request(self, user_id: str, text: str, *, client: str | None, cost: int = 1,
                       system_prompt: str | None = None) -> str:
        """Refuse, before anything is written or generated, what the store or the limits would refuse."""
        if not isinstance(text, str) or not text.strip():
            raise UserFacingError("Write a message first.")
        if len(text) > self.config.max_input_chars:
            raise UserFacingError(
                f"Your message is {len(text):,} characters; the limit is {self.config.max_input_chars:,}. "
                "Please shorten it."
            )
        try:
            clean_text(text, field="Your message", max_chars=self.config.max_input_chars)
            if system_prompt:
                clean_text(system_prompt, field="The system prompt", max_chars=self.config.max_system_prompt_chars,
                           allow_empty=True)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self.limits.generation(user_id, client, cost)
        return text

    def _check_fits(self, text: str, system_prompt: str | None, sampling: SamplingConfig) -> None:
        """Refuse, before it is stored, a message that alone (with its system prompt) leaves no room for a reply."""
        messages: Messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        try:
            self.engine.format.fit_messages(messages + [{"role": "user", "content": text}], sampling.max_tokens)
        except EngineError as exc:
            raise UserFacingError(str(exc)) from exc

    @staticmethod
    def _check_sampling(sampling: SamplingConfig) -> SamplingConfig:
        numbers = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values()):
            raise UserFacingError("Temperature and top-p must be numbers.")
        if not 0 <= sampling.temperature <= 2 or not 0 < sampling.top_p <= 1:
            raise UserFacingError("Temperature must be between 0 and 2, and top-p between 0 (excluded) and 1.")
        if not 1 <= sampling.max_tokens <= 4096:
            raise UserFacingError("Max new tokens must be between 1 and 4096.")
        rp = sampling.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and 1.0 <= rp <= 2.0):
            raise UserFacingError("The repetition penalty must be between 1 (none) and 2.")
        for penalty in (sampling.frequency_penalty, sampling.presence_penalty):
            if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and -2.0 <= penalty <= 2.0):
                raise UserFacingError("The frequency and presence penalties must be between -2 and 2 (0: none).")
        if not (isinstance(sampling.min_p, (int, float)) and math.isfinite(sampling.min_p) and 0.0 <= sampling.min_p <= 1.0):
            raise UserFacingError("Min-p must be between 0 (off) and 1.")
        return sampling

    # -- chat -------------------------------------------------------------------------
    async def _stream_reply(self, user_id: str, conversation_id: int, user_message_id: int,
                            version: ServedVersion, sampling: SamplingConfig,
                            kind: str = "chat", reply_client_id: str | None = None) -> AsyncIterator[StreamUpdate]:
        """Stream one reply to `user_message_id` from `version` and store it (even if stopped), with
        `reply_client_id` as its client id (the API's completion id) if given."""
        messages = (await self._db(self.store.context, user_message_id)).as_chat()
        try:
            messages, dropped = self.engine.format.fit_messages(messages, sampling.max_tokens)
        except EngineError as exc:
            raise UserFacingError(str(exc)) from exc
        text, last = "", None
        start = time.perf_counter()
        first_token: float | None = None
        finish_reason = "abort"
        async with self.router.lease(version) as served:
            error = None
            try:
                async for chunk in self.engine.stream(messages, adapter=served.adapter, sampling=sampling):
                    text, last = storable(chunk.text), chunk
                    if first_token is None and chunk.delta:
                        first_token = time.perf_counter() - start
                    if chunk.finished:
                        finish_reason = chunk.finish_reason or "stop"
                    else:
                        yield StreamUpdate(text, conversation_id, user_message_id)
            except (GeneratorExit, asyncio.CancelledError):
                # The user pressed Stop (the generator was closed): the cut-off reply is kept so the
                # conversation shows it; it cannot be voted on (feedback_db.UNVOTABLE_FINISH_REASONS).
                # Stored from a store thread without awaiting it: a closed generator cannot await.
                self._store_pool.submit(self._store_reply, user_id, conversation_id, user_message_id, served, text,
                                        sampling, start, last, "abort", reply_client_id)
                self.metrics.request(kind, "stopped")
                raise
            except Exception as exc:
                log.exception("engine failed on %s", served.name)
                finish_reason, error = "error", engine_failure_message(exc)
            reply_id = await self._db(self._store_reply, user_id, conversation_id, user_message_id, served, text,
                                      sampling, start, last, finish_reason, reply_client_id)
        self.metrics.request(kind, "error" if error else "ok")
        self.metrics.reply(served.name, last.completion_tokens if last else 0, first_token, time.perf_counter() - start)
        yield StreamUpdate(text, conversation_id, user_message_id, reply_id=reply_id, finished=True, error=error,
                           note=context_note(dropped), finish_reason=finish_reason,
                           prompt_tokens=last.prompt_tokens if last else None,
                           completion_tokens=last.completion_tokens if last else None)

    def _store_reply(self, user_id: str, conversation_id: int, parent_id: int, served: ServedVersion, text: str,
                     sampling: SamplingConfig, start: float, last: ReplyChunk | None, finish_reason: str,
                     client_id: str | None = None) -> int:
        return self.store.add_reply(
            conversation_id, user_id, parent_id, text,
            Reply(
                model_version_id=served.version_id,
                sampling=sampling.as_dict(),
                latency_ms=round((time.perf_counter() - start) * 1000, 1),
                prompt_tokens=last.prompt_tokens if last else None,
                completion_tokens=last.completion_tokens if last else None,
                finish_reason=finish_reason,
            ),
            client_id=client_id,
        )

    def _start_turn(self, user_id: str, text: str, conversation_id: int | None, parent_id: int | None,
                    system_prompt: str | None, client_id: str | None,
                    edits: int | None = None) -> tuple[int, int]:
        """(conversation id, user message id): a new conversation, or a turn answering `parent_id`, or
        an edit of the caller's user message `edits`: a sibling of it (the same parent, also the root).

        Any other turn in an existing conversation must answer one of its replies: a turn with no parent
        there would start a second root with no context (what a Send during a stream used to do). The
        one exception: after the caller's own turn that never got a reply, the new turn replaces it (a
        sibling; a second root when that turn was the first).
        """
        if edits is not None:
            edited = self.store.message(edits)
            if (conversation_id is None or edited["conversation_id"] != conversation_id or edited["role"] != "user"
                    or edited["user_id"] != user_id):
                raise UserFacingError("Only a message you sent in this conversation can be edited.")
            parent_id = edited["parent_id"]
        elif conversation_id is None:
            conversation_id = self.store.create_conversation(user_id, system_prompt=system_prompt,
                                                             title=conversation_title(text))
        elif parent_id is None:
            raise UserFacingError("Wait until the reply has finished (or press Stop), then send your next message.")
        if edits is not None:
            self.store.owned_conversation(user_id, conversation_id)
        # A turn of the caller's that never got a reply (the server stopped while answering it) is
        # replaced by this one rather than followed by it (FeedbackStore.add_user_message).
        message_id = self.store.add_user_message(conversation_id, user_id, text, parent_id=parent_id,
                                                 client_id=client_id, replace_unanswered=edits is None)
        return conversation_id, message_id

    async def chat(self, user_id: str, text: str, *, conversation_id: int | None = None, parent_id: int | None = None,
                   system_prompt: str | None = None, sampling: SamplingConfig | None = None,
                   client_id: str | None = None, client: str | None = None,
                   edits: int | None = None) -> AsyncIterator[StreamUpdate]:
        """Add a user turn (a new conversation when `conversation_id` is None) and stream the live reply.
        `edits`: the id of the caller's own user message this turn rewrites (a new branch beside it).

        `client` is the caller's address (limits are per identity and per address).
        """
        sampling = self._check_sampling(sampling or self.config.default_sampling)
        self._check_request(user_id, text, client=client, system_prompt=system_prompt)
        if conversation_id is not None and conversation_id in self._generating:
            raise UserFacingError("Wait until the reply has finished (or press Stop), then send your next message.")
        self._check_fits(text, system_prompt if conversation_id is None else None, sampling)
        try:
            conversation_id, user_message_id = await self._db(self._start_turn, user_id, text, conversation_id,
                                                              parent_id, system_prompt, client_id, edits)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        async for update in self._guarded_stream(user_id, conversation_id, user_message_id, sampling):
            yield update

    async def _guarded_stream(self, user_id: str, conversation_id: int, user_message_id: int,
                              sampling: SamplingConfig, kind: str = "chat") -> AsyncIterator[StreamUpdate]:
        """The live version's reply, with the conversation marked busy while it streams. The first update
        (no text yet) says the turn is accepted and the conversation busy: the page shows the user's turn
        then, not with the first token."""
        if conversation_id in self._generating:
            raise UserFacingError("Wait until the reply has finished (or press Stop), then try again.")
        self._generating.add(conversation_id)
        try:
            yield StreamUpdate("", conversation_id, user_message_id)
            await self.router.refresh()
            async for update in self._stream_reply(user_id, conversation_id, user_message_id,
                                                   self.router.pick("live"), sampling, kind):
                yield update
        finally:
            self._generating.discard(conversation_id)

    async def regenerate(self, user_id: str, user_message_id: int, *, sampling: SamplingConfig | None = None,
                         client: str | None = None) -> AsyncIterator[StreamUpdate]:
        """Another reply to the same user turn: stored as a sibling of the earlier ones."""
        sampling = self._check_sampling(sampling or self.config.default_sampling)
        self.limits.generation(user_id, client)
        try:
            msg = await self._db(self.store.message, user_message_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        if msg["user_id"] != user_id or msg["role"] != "user":
            raise UserFacingError("That message cannot be regenerated.")
        async for update in self._guarded_stream(user_id, msg["conversation_id"], user_message_id, sampling,
                                                 kind="regenerate"):
            yield update

    # -- what the page says about the model -------------------------------------------
    STATUS_TTL_S = 2.0
    STALE_PROGRESS_S = 600.0  # a "running" round silent this long is taken for dead (its process crashed)

    async def model_status(self) -> dict[str, Any]:
        """{"live": name, "bare_base": bool, "training": progress dict or None} for the page's banner;
        read at most every STATUS_TTL_S however many browsers ask."""
        now = time.monotonic()
        if self._status is not None and now - self._status[0] < self.STATUS_TTL_S:
            return self._status[1]
        running = await self._db(self.registry.running_round)
        progress = None
        if running is not None:
            progress = dict(running.metrics.get("progress") or {"step": "starting"})
            at = progress.get("at")
            age = time.time() - _utc_seconds(at) if at else 0.0
            if age > self.STALE_PROGRESS_S:
                progress = None
            else:
                progress["round_id"] = running.id
        live = self.router.live
        status = {"live": live.name if live else None, "bare_base": bool(live and live.adapter is None),
                  "training": progress}
        self._status = (now, status)
        return status

    # -- the OpenAI-compatible API (chat_app/openai_api.py) -------------------------------
    async def api_chat(self, user_id: str, chat: Messages, *, system_prompt: str | None, version: ServedVersion,
                       sampling: SamplingConfig, completion_id: str | None = None,
                       client: str | None = None) -> AsyncIterator[StreamUpdate]:
        """A reply from `version` to a whole history sent by a stateless client (user/assistant turns
        ending with the user's). The history is looked up among the user's stored API conversations
        (`FeedbackStore.find_path`): a follow-up extends its conversation and a regenerated reply becomes
        a sibling of the earlier ones, so thumbs and comparisons on them mean what they do in the UI.
        Otherwise a new conversation holds the history; assistant turns that no served version wrote
        are stored under the external version `API_CLIENT_VERSION`."""
        sampling = self._check_sampling(sampling)
        self._check_request(user_id, chat[-1]["content"], client=client, system_prompt=system_prompt)
        self._check_fits(chat[-1]["content"], system_prompt, sampling)
        try:
            conversation_id, user_message_id = await self._db(self._api_turn, user_id, chat, system_prompt)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        async for update in self._stream_reply(user_id, conversation_id, user_message_id, version, sampling,
                                               kind="api", reply_client_id=completion_id):
            yield update

    def _api_turn(self, user_id: str, chat: Messages, system_prompt: str | None) -> tuple[int, int]:
        """(conversation id, user message id) for `chat`, stored as `api_chat` describes."""
        store = self.store
        found = store.find_path(user_id, chat, system_prompt=system_prompt, source="api")
        if found is not None:
            return store.message(found)["conversation_id"], found
        history = chat[:-1]
        parent = store.find_path(user_id, history, system_prompt=system_prompt, source="api") if history else None
        if parent is not None:
            conversation_id = store.message(parent)["conversation_id"]
        else:
            conversation_id = store.create_conversation(user_id, system_prompt=system_prompt, source="api",
                                                        title=conversation_title(chat[0]["content"]))
            for turn in history:
                if turn["role"] == "user":
                    parent = store.add_user_message(conversation_id, user_id, turn["content"], parent_id=parent)
                else:
                    external = self.registry.ensure_version(API_CLIENT_VERSION, kind="external")
                    parent = store.add_reply(conversation_id, user_id, parent, turn["content"],
                                             Reply(model_version_id=external.id, finish_reason="stop"))
        return conversation_id, store.add_user_message(conversation_id, user_id, chat[-1]["content"], parent_id=parent)

    def reply_id_for(self, user_id: str, completion_id: str) -> int:
        """The stored reply the API answered as `completion_id` (one of this user's)."""
        try:
            return self.store.reply_by_client_id(user_id, completion_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc

    def compare_replies(self, user_id: str, reply_a: int, reply_b: int, choice: str, *, client_id: str | None = None,
                        client: str | None = None) -> int:
        """A pairwise vote between two of the user's replies to one message (A, B, tie or both_bad)."""
        self.limits.feedback(user_id, client)
        try:
            comparison_id = self.store.record_comparison(user_id, reply_a, reply_b, choice, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self.metrics.stored("comparison")
        return comparison_id

    # -- feedback (called on Gradio's worker threads) --------------------------------------
    def rate(self, user_id: str, reply_id: int, value: int, *, reasons: list[str] | None = None,
             comment: str | None = None, client_id: str | None = None, client: str | None = None) -> int:
        self.limits.feedback(user_id, client)
        try:
            rating_id = self.store.record_rating(user_id, reply_id, value, reasons=reasons, comment=comment or None,
                                                 client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self.metrics.stored("rating")
        return rating_id

    def demonstrate(self, user_id: str, user_message_id: int, text: str, *, replaces_reply_id: int | None = None,
                    client_id: str | None = None, client: str | None = None) -> int:
        self.limits.feedback(user_id, client)
        try:
            demo_id = self.store.record_demonstration(user_id, user_message_id, text,
                                                      replaces_message_id=replaces_reply_id, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self.metrics.stored("demonstration")
        return demo_id

    # -- compare ----------------------------------------------------------------------
    async def battle(self, user_id: str, text: str, *, system_prompt: str | None = None,
                     sampling: SamplingConfig | None = None, rng: random.Random | None = None,
                     client: str | None = None) -> AsyncIterator[Battle]:
        """Stream two replies side by side: live vs candidate (or two samples of live), sides shuffled."""
        sampling = self._check_sampling(sampling or self.config.default_sampling)
        self._check_request(user_id, text, client=client, cost=2, system_prompt=system_prompt)
        self._check_fits(text, system_prompt, sampling)
        await self.router.refresh()
        left, right = self.router.battle_pair(rng)

        def open_battle() -> tuple[int, int]:
            conv = self.store.create_conversation(user_id, system_prompt=system_prompt, source="compare",
                                                  title=conversation_title(text))
            return conv, self.store.add_user_message(conv, user_id, text)

        try:
            conv, q = await self._db(open_battle)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        battle = Battle(conv, q, [0, 0], ["", ""], [left.name, right.name])
        self._battles[q] = battle
        while len(self._battles) > 10_000:  # forget the oldest unvoted battles
            self._battles.pop(next(iter(self._battles)))
        streams = [self._stream_reply(user_id, conv, q, version, _nth_sample(sampling, side), "compare")
                   for side, version in enumerate((left, right))]
        async for battle in _streamed_into(battle, streams):
            yield battle

    def get_battle(self, key: int) -> Battle:
        """A battle started in this process, by the id of its prompt message."""
        battle = self._battles.get(key)
        if battle is None:
            raise UserFacingError("That comparison has expired; start a new one.")
        return battle

    def vote(self, user_id: str, battle: Battle | int, choice: str, *, client_id: str | None = None,
             client: str | None = None) -> list[str]:
        """Record the Compare vote; return the two version names (revealed after the vote)."""
        if isinstance(battle, int):
            battle = self.get_battle(battle)
        if not battle.done or 0 in battle.reply_ids:
            raise UserFacingError("Wait until both replies have finished, then vote.")
        self.limits.feedback(user_id, client)
        try:
            self.store.record_comparison(user_id, battle.reply_ids[0], battle.reply_ids[1], choice, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self._battles.pop(battle.user_message_id, None)
        self.metrics.stored("comparison")
        if self.config.auto_promote is not None:
            promoted = auto_promote_candidate(self.store, self.router.base_model, policy=self.config.auto_promote)
            if promoted:  # the router's next registry poll (≤ 0.25 s) switches to it
                log.info("auto-promoted %s after Compare votes", promoted)
        return battle.versions

    # -- rank -------------------------------------------------------------------------
    async def rank_stream(self, user_id: str, text: str, k: int, *, system_prompt: str | None = None,
                          sampling: SamplingConfig | None = None,
                          client: str | None = None) -> AsyncIterator[Ranking]:
        """K replies from the live version to one prompt, stored as siblings, streamed side by side where the
        engine decodes concurrent streams together (vLLM); otherwise generated as one batch of K and
        yielded when all are done (the transformers engine would run K streams one after another)."""
        if not isinstance(k, int) or not 2 <= k <= 9:
            raise UserFacingError("Choose between 2 and 9 replies to rank.")
        sampling = self._check_sampling(sampling or self.config.default_sampling)
        self._check_request(user_id, text, client=client, cost=k, system_prompt=system_prompt)
        self._check_fits(text, system_prompt, sampling)

        def open_ranking() -> tuple[int, int]:
            conv = self.store.create_conversation(user_id, system_prompt=system_prompt, source="rank",
                                                  title=conversation_title(text))
            return conv, self.store.add_user_message(conv, user_id, text)

        try:
            conv, q = await self._db(open_ranking)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        ranking = Ranking(conv, q, [0] * k, [""] * k)
        await self.router.refresh()
        version = self.router.pick("live")
        if not self.engine.batches_streams:
            ranking.reply_ids, ranking.texts = await self._rank_in_one_batch(user_id, conv, q, version, k, sampling)
            ranking.done = True
            yield ranking
            return
        streams = [self._stream_reply(user_id, conv, q, version, _nth_sample(sampling, i), "rank") for i in range(k)]
        async for ranking in _streamed_into(ranking, streams):
            yield ranking

    async def _rank_in_one_batch(self, user_id: str, conv: int, q: int, version: ServedVersion, k: int,
                                 sampling: SamplingConfig) -> tuple[list[int], list[str]]:
        messages = (await self._db(self.store.context, q)).as_chat()
        start = time.perf_counter()
        async with self.router.lease(version) as served:
            try:
                completions = await self.engine.generate(messages, k, adapter=served.adapter, sampling=sampling)
            except Exception as exc:
                log.exception("engine failed on %s", served.name)
                self.metrics.request("rank", "error")
                raise UserFacingError(engine_failure_message(exc)) from exc
        latency = round((time.perf_counter() - start) * 1000, 1)
        self.metrics.request("rank", "ok")
        for c in completions:
            self.metrics.reply(served.name, c.completion_tokens, None, latency / 1000)

        texts = [storable(c.text) for c in completions]

        def store_replies() -> list[int]:
            return [self.store.add_reply(conv, user_id, q, text,
                                         Reply(served.version_id, sampling.as_dict(), latency, c.prompt_tokens,
                                               c.completion_tokens, c.finish_reason))
                    for c, text in zip(completions, texts)]

        return await self._db(store_replies), texts

    def submit_ranking(self, user_id: str, ranked_reply_ids: list[int], *, client_id: str | None = None,
                       client: str | None = None) -> int:
        self.limits.feedback(user_id, client)
        try:
            ranking_id = self.store.record_ranking(user_id, ranked_reply_ids, client_id=client_id)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        self.metrics.stored("ranking")
        return ranking_id

    # -- operators --------------------------------------------------------------------
    def promotable_versions(self) -> list[dict]:
        """Policy versions an operator may make live here: the candidates (newest first), then the versions
        that were live before (most recently live first), each built on this server's base model, with its
        adapter folder present and not known to fail to load. Each has a ``label`` for the list.

        Left out: versions withdrawn with `retire` (never live, taken out on purpose). A candidate whose
        round gates did not all pass is offered, since the operator may overrule the gates, and says so.
        """
        withdrawn = {e["version_id"] for e in self.registry.history("policy") if e["action"] == "retire"}
        earlier = sorted((v for v in self.registry.list("policy", "retired") if v.promoted_at and v.id not in withdrawn),
                         key=lambda v: v.promoted_at, reverse=True)
        out = []
        for v in self.registry.candidates("policy") + earlier:
            if v.name in self.router.load_errors or v.base_model not in (None, self.router.base_model):
                continue
            if v.adapter_path and not Path(v.adapter_path).is_dir():
                continue
            note = (" (was live)" if v.status == "retired" else
                    " (gates not all passed)" if v.metrics.get("gates_passed") is False else "")
            out.append({"name": v.name, "label": v.name + note, "created_at": v.created_at})
        return out

    async def promote(self, version: int | str, *, actor: str) -> str:
        """Make a version live now and return its name, once the router serves it.

        The adapter is loaded before the registry is touched: a version this server cannot serve is
        refused with the engine's reason, and nothing changes.
        """
        try:
            target = await self._db(self.registry.get, version)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        if target.kind != "policy":
            raise UserFacingError(f"{target.name} is a {target.kind} model, not a policy; only policies go live.")
        if target.base_model not in (None, self.router.base_model):
            raise UserFacingError(f"{target.name} was trained on {target.base_model}, but this server serves "
                                  f"{self.router.base_model}; it cannot go live here.")
        error = await self.router.prepare(target)
        if error:
            raise UserFacingError(f"{target.name} cannot be served, so it was not promoted: {error}")
        try:
            promoted = await self._db(self.registry.promote, target.name, actor=actor)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        await self.router.sync()
        return self._confirm_live(promoted.name)

    async def rollback(self, *, actor: str) -> str:
        """Return to the previous live version now."""
        try:
            restored = await self._db(self.registry.rollback, "policy", actor=actor)
        except FeedbackError as exc:
            raise UserFacingError(str(exc)) from exc
        await self.router.sync()
        return self._confirm_live(restored.name)

    def _confirm_live(self, name: str) -> str:
        """`name` if the router now serves it live, else an error saying what it serves instead."""
        serving = self.router.live.name if self.router.live else None
        if serving != name:
            reason = self.router.load_errors.get(name, "the router did not switch")
            raise UserFacingError(f"The registry now marks {name} live, but this server still serves {serving}: "
                                  f"{reason}. Roll back, or fix the adapter and promote again.")
        return name


def _nth_sample(sampling: SamplingConfig, n: int) -> SamplingConfig:
    """The n-th of several samples to one prompt: a distinct seed, so samples of one version differ."""
    return replace(sampling, seed=None if sampling.seed is None else sampling.seed + n)


async def _streamed_into(item: T, streams: list[AsyncIterator[StreamUpdate]]) -> AsyncIterator[T]:
    """Several replies to one prompt streamed concurrently into a Battle or a Ranking (its `texts`,
    `reply_ids` once stored, `done` at the end), yielding it after each update."""
    async for i, update in _merged(streams):
        item.texts[i] = update.error or update.text
        if update.reply_id is not None:
            item.reply_ids[i] = update.reply_id
        yield item
    item.done = True
    yield item


async def _merged(streams: list[AsyncIterator[StreamUpdate]]) -> AsyncIterator[tuple[int, StreamUpdate]]:
    """(index, update) from several reply streams run concurrently, as they come; closing this closes them."""
    queue: asyncio.Queue[tuple[int, StreamUpdate | None]] = asyncio.Queue()

    async def run(i: int, stream: AsyncIterator[StreamUpdate]) -> None:
        try:
            async for update in stream:
                await queue.put((i, update))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(run(i, stream)) for i, stream in enumerate(streams)]
    try:
        finished = 0
        while finished < len(tasks):
            i, update = await queue.get()
            if update is None:
                finished += 1
                continue
            yield i, update
    finally:
        for t in tasks:
            t.cancel()
