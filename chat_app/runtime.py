"""What the server's request handlers share at run time: the service (once the engine is up), who may
act as admin, how callers are identified, and the round the dashboard started."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .identity import AnonymousIdQuota, Caller, IdentitySigner
from .limits import UserFacingError
from .service import ChatService

if TYPE_CHECKING:
    import gradio as gr


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
