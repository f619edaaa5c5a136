"""Gradio's state per browser session, without the config copy of every block on the page.

Gradio (6.x) keeps a `SessionState` for every session hash it sees, which is every page view and every
raw `queue/join` from a new session. Its constructor renders the config of *every* block on the page
(`config_values`, kept only to answer deep links, which this app does not offer). For this app's 145
blocks that is about 9 ms of CPU on the event loop and 220 KiB held per session (a page load over HTTP
cost the server 18 ms and 250 KiB; now 7 ms and 41 KiB). Gradio keeps up to 10,000 sessions: a stranger
who joins from new session hashes costs the server about 2.4 GB and blocks every stream while doing so
(`scripts/bench_sessions.py` measures it).

`LeanSessionState` runs Gradio's own constructor with no blocks to render, and renders a block's config
when Gradio first updates it; its `components` (the deep-link view) renders the rest on demand, so it
answers as Gradio's does. `use_lean_sessions(demo)` switches a mounted app's state holder to it after
checking, on this Gradio, that a lean session describes the page exactly as a stock one; if not, it
logs why and leaves Gradio as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from gradio.state_holder import SessionState, StateHolder

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)


class LeanSessionState(SessionState):
    """A Gradio SessionState that renders a block's config only when it is first needed."""

    def __init__(self, blocks: gr.Blocks) -> None:
        # Gradio's constructor renders the config of each block in `blocks.blocks`: give it none.
        super().__init__(SimpleNamespace(default_config=blocks.default_config, blocks={}))  # type: ignore[arg-type]
        self._page_blocks = blocks.blocks  # what the stock constructor would have rendered

    @property
    def components(self) -> Iterator[dict]:
        """Every block's config, as the stock SessionState lists them (for a deep link)."""
        for key, block in self.blocks_config.blocks.items():
            if key in self._page_blocks and key not in self.config_values:
                self.config_values[key] = self.blocks_config.config_for_block(key, [], block)
        for config in self.config_values.values():
            if config:
                yield config


class LeanStateHolder(StateHolder):
    """Gradio's StateHolder, creating LeanSessionStates."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = LeanSessionState(self.blocks)
        return super().__getitem__(session_id)


def _described(session: SessionState) -> list[Any]:
    """A session's view of the page, in a comparable order."""
    return sorted(session.components, key=lambda config: config["id"])


def use_lean_sessions(demo: gr.Blocks) -> bool:
    """Switch `demo`'s state holder (set when Gradio mounted it) to lean sessions; True if it did.

    It does only after checking that a lean session describes the page exactly as Gradio's own does.
    """
    holder = getattr(demo, "state_holder", None)
    if type(holder) is not StateHolder:
        log.warning("Gradio's state holder is %s, not the StateHolder this app knows; every session keeps "
                    "Gradio's full copy of the page's config.", type(holder).__name__)
        return False
    try:
        same = _described(LeanSessionState(demo)) == _described(SessionState(demo))
    except Exception as exc:  # a Gradio whose SessionState takes something else
        log.warning("lean sessions do not work with this Gradio (%s: %s); every session keeps Gradio's full "
                    "copy of the page's config.", type(exc).__name__, exc)
        return False
    if not same:
        log.warning("a lean session describes the page differently from Gradio's own on this Gradio; every "
                    "session keeps Gradio's full copy of the page's config.")
        return False
    holder.__class__ = LeanStateHolder
    return True
