"""State and helpers shared by the tabs."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import gradio as gr

from feedback_db import FeedbackError

from ..engines.base import SamplingConfig
from ..identity import AnonymousIdQuota, Caller, IdentitySigner
from ..limits import UserFacingError
from ..service import ChatService

log = logging.getLogger(__name__)

T = TypeVar("T")

THUMBS_UP_REASONS = ["helpful", "correct", "clear", "friendly", "creative"]
THUMBS_DOWN_REASONS = ["unhelpful", "wrong / made up", "harmful", "rude", "too long", "too short", "off topic",
                       "repetitive", "cut off"]


@dataclass
class Runtime:
    """What handlers need at request time; `service` is set once the engine has started."""

    signer: IdentitySigner
    anonymous_ids: AnonymousIdQuota
    service: ChatService | None = None
    admin_password: str | None = None
    admin_users: set[str] = field(default_factory=set)
    startup_error: str | None = None
    fatal_error: str | None = None  # set when the engine died; the server is stopping
    base_model: str = "default"  # what a round started from the dashboard trains on
    rounds_dir: Path | None = None  # where it writes (None: RoundConfig's default)
    round_process: subprocess.Popen | None = None  # the last round the dashboard started

    def require(self) -> ChatService:
        if self.fatal_error is not None:
            raise UserFacingError(self.fatal_error)
        if self.service is None:
            raise UserFacingError(self.startup_error or "The model is still loading; try again in a few seconds.")
        return self.service

    def identify(self, request: gr.Request | None, session_user: str | None) -> str:
        """Who is asking, from what the server issued only.

        The logged-in name (checked by the server at login); else the id this server put in the
        session's state (at page load, from a signed token, or by an earlier call); else a new
        anonymous id for this session (limited per client address). Never an id the client sent.
        """
        if request is not None and getattr(request, "username", None):
            return str(request.username)
        if session_user:
            return session_user
        self.anonymous_ids.take(client_address(request))
        return self.signer.new_anonymous_id()

    def resolve(self, request: gr.Request | None, session_user: str | None) -> tuple[ChatService, Caller]:
        """(the service, the caller: an identity known to the store, and an address) or a refusal."""
        svc = self.require()
        return svc, Caller(svc.ensure_user(self.identify(request, session_user)), client_address(request))


def client_address(request: gr.Request | None) -> str:
    """The peer address of the request (the proxy's, behind a reverse proxy)."""
    client = getattr(request, "client", None) if request is not None else None
    return str(getattr(client, "host", None) or "unknown")


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
        log.info("refused: %s", exc)
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
