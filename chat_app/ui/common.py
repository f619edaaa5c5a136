"""State and helpers shared by the tabs."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import gradio as gr

from ..engines.base import SamplingConfig
from ..limits import UserFacingError
from ..service import ChatService

log = logging.getLogger(__name__)

THUMBS_UP_REASONS = ["helpful", "correct", "clear", "friendly", "creative"]
THUMBS_DOWN_REASONS = ["unhelpful", "wrong / made up", "harmful", "rude", "too long", "too short", "off topic",
                       "repetitive", "cut off"]


@dataclass
class Runtime:
    """What handlers need at request time; `service` is set once the engine has started."""

    service: ChatService | None = None
    admin_password: str | None = None
    admin_users: set[str] = field(default_factory=set)
    startup_error: str | None = None

    def require(self) -> ChatService:
        if self.service is None:
            raise gr.Error(self.startup_error or "The model is still loading; try again in a few seconds.")
        return self.service


def user_id_for(request: gr.Request | None, stored: str | None) -> str:
    """The logged-in user name, else the anonymous id kept in the browser, else a new one."""
    if request is not None and getattr(request, "username", None):
        return str(request.username)
    return stored or f"anon-{uuid.uuid4().hex[:12]}"


def sampling_from(temperature: float, top_p: float, max_tokens: float) -> SamplingConfig:
    return SamplingConfig(temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens))


def show_error(exc: Exception) -> gr.Error:
    """A refusal the user should read, as a Gradio error toast (logged too)."""
    if isinstance(exc, UserFacingError):
        return gr.Error(str(exc), print_exception=False)
    log.exception("handler failed")
    return gr.Error(f"Something went wrong on the server ({type(exc).__name__}: {exc}). The error was logged.")
