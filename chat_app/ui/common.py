"""Helpers shared by the tabs: the user-handler decorator, errors users can read, the stream pacer."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import gradio as gr

from feedback_db import FeedbackError, for_operator

from ..engines.base import SamplingConfig
from ..limits import UserFacingError
from ..runtime import Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")

THUMBS_UP_REASONS = ["helpful", "correct", "clear", "friendly", "creative"]
THUMBS_DOWN_REASONS = ["unhelpful", "wrong / made up", "harmful", "rude", "too long", "too short", "off topic",
                       "repetitive", "cut off"]


def user_handler(rt: Runtime) -> Callable[[Callable], Callable]:
    """Decorator for a Gradio handler that acts for a user.

    The handler is written as ``fn(svc, who, *inputs)`` (`who`: the Caller); Gradio sees
    ``fn(*inputs, session_user, request)``: its last input must be the session's user state
    (`gr.State`, held by the server). The wrapper resolves the user (Runtime.resolve, off the event
    loop for async handlers) and reports failures (`show_error`: an API caller gets the error, a
    browser a toast). Generators stay generators.
    """

    def wrap(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())[2:]
        signature = inspect.Signature(params + [
            inspect.Parameter("session_user", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
        ])

        if inspect.isasyncgenfunction(fn):
            async def wrapper(*args):
                *inputs, session_user, request = args
                try:
                    svc, who = await asyncio.to_thread(rt.resolve, request, session_user)
                    async for item in fn(svc, who, *inputs):
                        yield item
                except Exception as exc:
                    raise show_error(exc) from exc
        elif inspect.iscoroutinefunction(fn):
            async def wrapper(*args):
                *inputs, session_user, request = args
                try:
                    svc, who = await asyncio.to_thread(rt.resolve, request, session_user)
                    return await fn(svc, who, *inputs)
                except Exception as exc:
                    raise show_error(exc) from exc
        else:
            def wrapper(*args):
                *inputs, session_user, request = args
                try:
                    svc, who = rt.resolve(request, session_user)
                    return fn(svc, who, *inputs)
                except Exception as exc:
                    raise show_error(exc) from exc

        functools.update_wrapper(wrapper, fn)
        del wrapper.__wrapped__  # Gradio must see the new signature, not fn's
        wrapper.__signature__ = signature
        # Gradio finds its special arguments (gr.Request, gr.LikeData) by type hint, not by signature.
        wrapper.__annotations__ = {**{p.name: p.annotation for p in params if p.annotation is not p.empty},
                                   "request": gr.Request}
        return wrapper
    return wrap


def sampling_from(temperature: float, top_p: float, max_tokens: float, frequency_penalty: float,
                  min_p: float) -> SamplingConfig:
    """The Settings sliders as a SamplingConfig (the service checks the ranges)."""
    return SamplingConfig(temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
                          frequency_penalty=float(frequency_penalty), min_p=float(min_p))


def show_error(exc: Exception) -> gr.Error:
    """What the user sees when a handler fails: the refusal itself when it was meant for them (a
    UserFacingError, the store's FeedbackError, or a gr.Error raised on purpose), else a plain message. Operators get one log
    line for a refusal and the traceback only for a real failure; users never see exception text."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, (UserFacingError, FeedbackError)):  # the store's errors say what to do (e.g. "busy")
        log.info("refused: %s", for_operator(exc))  # with the store's detail, e.g. who held the write lock
        return gr.Error(str(exc), print_exception=False)
    log.exception("handler failed")
    return gr.Error("Something went wrong on the server; please try again. If it keeps happening, tell the "
                    "operator (the error was logged).", print_exception=False)


@dataclass
class StreamPacer:
    """How often a streamed reply may send the page an update, shared by every stream of the server.

    Each update re-sends the whole conversation (or every Compare / Rank reply) through Gradio: about
    0.5 ms of server CPU (a thread hop per output, encoding, the event stream), taken from the cores the
    engine decodes on. A lone stream updates at most every `min_interval_s`; with n streams at once, each
    waits n / `updates_per_s` (at most `max_interval_s`), so together they send about `updates_per_s` a
    second however many users stream. The first update, the first with text (the first token) and the
    last are never held.
    """

    updates_per_s: float = 40.0
    min_interval_s: float = 0.05
    max_interval_s: float = 0.5
    streams: int = 0  # streams running now (all on the event loop's thread)
    clock: Callable[[], float] = time.monotonic

    def interval_s(self) -> float:
        return min(self.max_interval_s, max(self.min_interval_s, self.streams / self.updates_per_s))

    async def paced(self, updates: AsyncIterator[T], is_final: Callable[[T], bool],
                    has_text: Callable[[T], bool]) -> AsyncIterator[T]:
        """The updates of a stream, skipping those that come sooner than `interval_s()` after the last one
        sent (the next update carries a skipped one's text, so nothing is lost)."""
        self.streams += 1
        try:
            last_sent: float | None = None
            text_sent = False
            async for update in updates:
                now = self.clock()
                first_text = not text_sent and has_text(update)
                if (not is_final(update) and not first_text and last_sent is not None
                        and now - last_sent < self.interval_s()):
                    continue
                last_sent, text_sent = now, text_sent or first_text
                yield update
        finally:
            self.streams -= 1


STREAM_PACER = StreamPacer()  # the process's streams share one budget
