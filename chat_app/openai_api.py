"""An OpenAI-compatible API on the same server, engine and database as the UI.

    GET  /v1/models             the served versions: "alignloop" (whatever is live now), the live and the candidate
    POST /v1/chat/completions   a reply, streamed (server-sent events) or not, stored like a UI reply
    POST /v1/feedback           👍/👎 with reasons, a comparison of two completions, or a better reply

Any OpenAI client (the `openai` package, Open WebUI, LibreChat) can be the front end: base URL
`http://HOST:PORT/v1`, API key from `alignloop users key NAME`. Every reply is stored in feedback_db
with the model version that wrote it, in the caller's own conversations (source "api"), so what
people do through these clients trains the next round like what they do in the UI.

A stateless client sends the whole history each time; the service finds where that history ends in
the caller's stored conversations (`ChatService.api_chat`), so a follow-up extends its conversation
and a regenerated reply is a sibling of the earlier ones (a comparison between them means what it
means in the UI). The completion id (`chatcmpl-...`) is stored with the reply and names it in
/v1/feedback.

The same limits as the UI apply, per user and per client address; wrong keys are throttled per
address like wrong passwords. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from feedback_db import StoreBusyError

from .auth import ApiKeyDirectory, PasswordThrottle, throttle_keys, wait_text
from .engines.base import Messages, SamplingConfig
from .limits import RateLimited, UserFacingError
from .router import ServedVersion
from .service import ChatService, StreamUpdate

log = logging.getLogger(__name__)

LIVE_ALIAS = "alignloop"  # always the live version: a client configured with it follows every promotion
FEEDBACK_CHOICES = {"a": "A", "b": "B", "tie": "tie", "both_bad": "both_bad"}


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(exc: UserFacingError) -> ApiError:
    """A service refusal as the API answers it: 429 for limits, 503 while busy or loading, else 400."""
    if isinstance(exc, RateLimited):
        return ApiError(429, str(exc), type="rate_limit_exceeded", code="rate_limit_exceeded")
    if isinstance(exc.__cause__, StoreBusyError):
        return ApiError(503, str(exc), type="server_error", code="busy")
    return ApiError(400, str(exc))


# -- the request -------------------------------------------------------------------------------------


def text_of(content: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}: only text parts are supported (no images, audio or files).", param="messages")
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts.", param="messages")


def parse_messages(messages: Any) -> tuple[str | None, Messages]:
    """(system prompt, user/assistant turns ending with the user's) from OpenAI-style messages.

    System (and "developer") messages must come first and are joined; consecutive messages of one
    role are joined, as a chat template would see them anyway.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}.", param="messages")
    system: list[str] = []
    turns: Messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content.", param="messages")
        role = m.get("role")
        if role in ("system", "developer"):
            if turns:
                raise ApiError(400, f"messages[{i}]: system messages must come before the conversation.",
                               param="messages")
            system.append(text_of(m.get("content"), f"messages[{i}]"))
        elif role in ("user", "assistant"):
            text = text_of(m.get("content") if m.get("content") is not None else "", f"messages[{i}]")
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n\n" + text
            else:
                turns.append({"role": role, "content": text})
        else:
            raise ApiError(400, f"messages[{i}]: role {str(role)[:20]!r} is not supported (system, user, assistant).",
                           param="messages")
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user":
        raise ApiError(400, "The conversation must start and end with a user message.", param="messages")
    return ("\n\n".join(system) or None), turns


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number.", param=name)
    return float(value)


def parse_sampling(body: dict, default: SamplingConfig) -> SamplingConfig:
    """Sampling from the request (temperature, top_p, max_tokens or max_completion_tokens, frequency_penalty,
    presence_penalty, and the extensions repetition_penalty and min_p, as vLLM's server takes them); what alignloop cannot honour is refused, not
    silently ignored."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: send one request per reply (each is stored as a sibling).", param="n")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "stop sequences are not supported.", param="stop")
    if body.get("logprobs") or body.get("tools") or body.get("functions"):
        raise ApiError(400, "logprobs and tools are not supported.")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise ApiError(400, "max_tokens must be an integer.", param="max_tokens")
    return SamplingConfig(
        temperature=_number(body, "temperature", default.temperature),
        top_p=_number(body, "top_p", default.top_p),
        max_tokens=default.max_tokens if max_tokens is None else max_tokens,
        repetition_penalty=_number(body, "repetition_penalty", default.repetition_penalty),
        frequency_penalty=_number(body, "frequency_penalty", default.frequency_penalty),
        presence_penalty=_number(body, "presence_penalty", default.presence_penalty),
        min_p=_number(body, "min_p", default.min_p),
    )


def resolve_model(svc: ChatService, model: Any) -> ServedVersion:
    """The version a `model` names: "alignloop" or the live version's name (live), the candidate's name."""
    live, candidate = svc.router.live, svc.router.candidate
    if live is not None and model in (LIVE_ALIAS, live.name):
        return live
    if candidate is not None and model == candidate.name:
        return candidate
    served = ", ".join(m["id"] for m in model_list(svc))
    raise ApiError(404, f"The model {str(model)[:80]!r} is not served here; use one of: {served}.",
                   code="model_not_found", param="model")


def model_list(svc: ChatService) -> list[dict[str, Any]]:
    """"alignloop" (whatever is live), then the live and the candidate versions by name."""
    live, candidate = svc.router.live, svc.router.candidate
    named = [(LIVE_ALIAS, "alias of live", live), (live and live.name, "live", live),
             (candidate and candidate.name, "candidate", candidate)]
    return [{"id": name, "object": "model", "created": 0, "owned_by": "alignloop",
             "alignloop": {"role": role, "version": version.name}}
            for name, role, version in named if version is not None]


# -- the responses ------------------------------------------------------------------------------------


def _finish(update: StreamUpdate) -> str:
    return "length" if update.finish_reason == "length" else "stop"


def _usage(update: StreamUpdate) -> dict[str, int]:
    prompt, completion = update.prompt_tokens or 0, update.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(update: StreamUpdate) -> dict[str, Any]:
    """alignloop's own fields in a response: where the reply is stored, and any note for the user."""
    return {"reply_id": update.reply_id, "conversation_id": update.conversation_id, "note": update.note}


def completion_body(cid: str, created: int, model: str, update: StreamUpdate) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": update.text},
                         "finish_reason": _finish(update), "logprobs": None}],
            "usage": _usage(update), "alignloop": _extension(update)}


def chunk_body(cid: str, created: int, model: str, delta: dict[str, str], finish: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def stream_events(updates: AsyncIterator[StreamUpdate], first: StreamUpdate, cid: str, created: int,
                        model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed completion, from the service's cumulative updates.

    A client that disconnects closes this generator, which closes `updates`: the cut-off reply is
    stored as stopped, as in the UI.
    """
    sent = ""
    try:
        yield sse(chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
        update: StreamUpdate | None = first
        while update is not None:
            if update.finished and update.error:
                yield sse(ApiError(500, update.error, type="server_error").body())
                break
            if update.text.startswith(sent) and len(update.text) > len(sent):
                yield sse(chunk_body(cid, created, model, {"content": update.text[len(sent):]}))
                sent = update.text
            if update.finished:
                usage = {"usage": _usage(update)} if include_usage else {}
                yield sse(chunk_body(cid, created, model, {}, _finish(update), alignloop=_extension(update), **usage))
                break
            update = await anext(updates, None)
        yield sse("[DONE]")
    finally:
        await updates.aclose()


# -- the routes ---------------------------------------------------------------------------------------


def build_openai_router(service: Callable[[], ChatService], keys: ApiKeyDirectory,
                        throttle: PasswordThrottle | None = None) -> APIRouter:
    """The /v1 routes. `service()` returns the running ChatService or raises UserFacingError (loading,
    engine gone); `keys` says whose an API key is."""
    throttle = throttle or PasswordThrottle()
    router = APIRouter(prefix="/v1")

    async def caller(request: Request) -> tuple[ChatService, str, str]:
        """(service, user id, client address) for a request with a valid API key, else ApiError."""
        address = request.client.host if request.client else "unknown"
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not key:
            raise ApiError(401, "Send an API key: 'Authorization: Bearer KEY' (the OpenAI clients' api_key). An "
                                "operator makes one with `alignloop users key NAME`.", code="invalid_api_key")
        wait = throttle.retry_after(throttle_keys(address, None))
        if wait > 0:
            raise ApiError(429, f"Too many wrong API keys from your address. {wait_text(wait)}",
                           type="rate_limit_exceeded", code="rate_limit_exceeded")
        owner = await asyncio.to_thread(keys.owner, key)
        if owner is None:
            failures, _ = throttle.failed(throttle_keys(address, None))
            log.warning("wrong API key from %s (%d in a row)", address, failures)
            raise ApiError(401, "Incorrect API key. Ask the operator for one (`alignloop users key NAME`).",
                           code="invalid_api_key")
        try:
            svc = service()
        except UserFacingError as exc:
            raise ApiError(503, str(exc), type="server_error", code="unavailable") from None
        user_id = await asyncio.to_thread(svc.ensure_user, owner)
        return svc, user_id, address

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "The request body must be JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    @router.get("/models")
    async def models(request: Request) -> JSONResponse:
        try:
            svc, _, _ = await caller(request)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": model_list(svc)})

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            svc, user_id, address = await caller(request)
            body = await json_body(request)
            await svc.router.refresh()  # a version promoted a moment ago answers this request
            version = resolve_model(svc, body.get("model"))
            system_prompt, chat = parse_messages(body.get("messages"))
            sampling = parse_sampling(body, svc.config.default_sampling)
            stream = bool(body.get("stream", False))
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        except ApiError as exc:
            return exc.response()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        updates = svc.api_chat(user_id, chat, system_prompt=system_prompt, version=version, sampling=sampling,
                               completion_id=cid, client=address)
        try:  # the first update comes after every check, so a refusal is still an HTTP status
            first = await anext(updates)
        except UserFacingError as exc:
            await updates.aclose()
            return api_error(exc).response()
        if stream:
            return StreamingResponse(stream_events(updates, first, cid, created, version.name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        final = first
        try:
            async for final in updates:
                pass
        finally:
            await updates.aclose()
        if final.error:
            return ApiError(500, final.error, type="server_error").response()
        return JSONResponse(completion_body(cid, created, version.name, final))

    @router.post("/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """{"completion_id", "rating": 1|-1, "reasons"?, "comment"?} | {"completion_ids": [a, b], "choice":
        "a"|"b"|"tie"|"both_bad"} | {"completion_id", "better_reply": text}."""
        try:
            svc, user_id, address = await caller(request)
            body = await json_body(request)
            kind, row_id = await asyncio.to_thread(record_feedback, svc, user_id, address, body)
        except ApiError as exc:
            return exc.response()
        except UserFacingError as exc:
            return api_error(exc).response()
        return JSONResponse({"ok": True, "kind": kind, "id": row_id})

    return router


def record_feedback(svc: ChatService, user_id: str, address: str, body: dict[str, Any]) -> tuple[str, int]:
    """Store one piece of API feedback (runs on a worker thread: store calls block)."""
    def reply(cid: Any) -> int:
        if not isinstance(cid, str):
            raise ApiError(400, "Name a reply by the id of its completion ('chatcmpl-...').", param="completion_id")
        return svc.reply_id_for(user_id, cid)

    if "completion_ids" in body or "choice" in body:
        ids, choice = body.get("completion_ids"), body.get("choice")
        if not isinstance(ids, list) or len(ids) != 2:
            raise ApiError(400, "A comparison names two completions: completion_ids [a, b].", param="completion_ids")
        if choice not in FEEDBACK_CHOICES:
            raise ApiError(400, "choice must be 'a', 'b', 'tie' or 'both_bad'.", param="choice")
        return "comparison", svc.compare_replies(user_id, reply(ids[0]), reply(ids[1]), FEEDBACK_CHOICES[choice],
                                                 client=address)
    reply_id = reply(body.get("completion_id"))
    if "better_reply" in body:
        parent = svc.store.message(reply_id)["parent_id"]
        return "demonstration", svc.demonstrate(user_id, parent, body["better_reply"], replaces_reply_id=reply_id,
                                                client=address)
    rating = body.get("rating")
    if rating not in (1, -1) or isinstance(rating, bool):
        raise ApiError(400, "rating must be 1 (👍) or -1 (👎); or send completion_ids and choice, or better_reply.",
                       param="rating")
    reasons = body.get("reasons")
    if reasons is not None and (not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons)):
        raise ApiError(400, "reasons must be a list of strings.", param="reasons")
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise ApiError(400, "comment must be a string.", param="comment")
    return "rating", svc.rate(user_id, reply_id, rating, reasons=reasons, comment=comment, client=address)
