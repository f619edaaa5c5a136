"""Helpers shared by the tabs: the user-handler decorator, errors users can read, streaming throttle."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
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


# Each streamed update sends the whole conversation (or both Compare replies) to the browser: at most
# one every 50 ms keeps that cost off the cores the engine decodes on, without a visible difference.
STREAM_INTERVAL_S = 0.05


async def throttled(updates: AsyncIterator[T], is_final: Callable[[T], bool],
                    interval_s: float = STREAM_INTERVAL_S) -> AsyncIterator[T]:
    """The updates of a stream at most one per `interval_s`; a final update is always passed on (the
    next update carries the text of a skipped one, so nothing is lost)."""
    last_sent = 0.0
    async for update in updates:
        if not is_final(update) and time.monotonic() - last_sent < interval_s:
            continue
        last_sent = time.monotonic()
        yield update
