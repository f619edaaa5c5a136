"""How often Gradio's queue wakes the event loop when it has nothing to do.

Gradio (6.x, not on Windows) looks for queued events every 1 ms and for progress messages every 10 ms,
busy or idle: about 1,100 wake-ups a second on the event loop, about 3% of a core on an idle server
(measured on this project's 2-core machine). On a CPU server those wake-ups land on the cores the
engine decodes on, and each one pauses one of its compute threads while the other waits at a barrier.

`calm_queue_polling` sets both intervals: a queued event then starts at most `events_s` later (10 ms by
default, against a first token that takes 0.5 s under load), and the app sends no progress messages
(`gr.Progress` is unused), so those are looked for every `progress_s`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

EVENTS_POLL_S = 0.01
PROGRESS_POLL_S = 0.25


def calm_queue_polling(demo: gr.Blocks, *, events_s: float = EVENTS_POLL_S,
                       progress_s: float = PROGRESS_POLL_S) -> bool:
    """Set how often `demo`'s queue (after `demo.queue()`) polls; True if this Gradio has those settings."""
    queue = getattr(demo, "_queue", None)
    names = ("sleep_when_free", "progress_update_sleep_when_free")
    if queue is None or not all(isinstance(getattr(queue, name, None), (int, float)) for name in names):
        log.warning("this Gradio's queue has no %s settings; it polls at its own rate", " or ".join(names))
        return False
    queue.sleep_when_free = max(queue.sleep_when_free, events_s)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, progress_s)
    return True
