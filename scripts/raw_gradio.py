"""Calling a Gradio app the way a stranger (or a browser) can: raw HTTP to `/gradio_api/queue/join` by `fn_index`,
with any data, from any session, for every handler (including those with `api_name=False`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Outcome:
    """How one call ended: its output data, or the error the server sent."""

    success: bool
    data: list[Any] | None
    error: str | None
    status_code: int = 200


class RawGradio:
    """A raw HTTP client for one Gradio app."""

    def __init__(self, url: str, *, timeout: float = 120.0, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/") + "/"
        self.http = httpx.Client(timeout=timeout, headers=headers or {})
        response = self.http.get(self.url + "config")
        response.raise_for_status()
        self.config = response.json()
        self.components = {c["id"]: c for c in self.config["components"]}
        self.dependencies = self.config["dependencies"]

    def close(self) -> None:
        self.http.close()

    @staticmethod
    def new_session() -> str:
        return uuid.uuid4().hex[:11]

    def fn_index(self, api_name: str | None = None, *, trigger: str | None = None) -> int:
        """The id of the dependency with `api_name`, or (api_name None) the first triggered by `trigger`
        (e.g. "load")."""
        for dep in self.dependencies:
            if api_name is not None and dep.get("api_name") == api_name:
                return dep["id"]
            if trigger is not None and any(t[1] == trigger for t in dep.get("targets", [])):
                return dep["id"]
        raise KeyError(api_name or trigger)

    def inputs_of(self, fn_index: int) -> list[dict]:
        dep = next(d for d in self.dependencies if d["id"] == fn_index)
        return [self.components[i] for i in dep["inputs"]]

    def call(self, fn_index: int, data: list[Any], session: str, *, event_data: Any = None,
             on_message: Callable[[dict], None] | None = None) -> Outcome:
        """Join the queue with `data` for `fn_index` in `session`, and read the stream to its end;
        `on_message` sees every event as it arrives (e.g. to time the first streamed text)."""
        join = self.http.post(self.url + "gradio_api/queue/join",
                              json={"data": data, "fn_index": fn_index, "session_hash": session,
                                    "trigger_id": None, "event_data": event_data})
        if join.status_code != 200:
            return Outcome(False, None, join.text[:500], join.status_code)
        last: dict | None = None
        with self.http.stream("GET", self.url + "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if on_message is not None:
                    on_message(message)
                if message.get("msg") == "process_completed":
                    last = message
                    break
        if last is None:
            return Outcome(False, None, "the stream ended without a result")
        output = last.get("output") or {}
        if not last.get("success", False):
            return Outcome(False, None, str(output.get("error") or output))
        return Outcome(True, output.get("data"), None)
