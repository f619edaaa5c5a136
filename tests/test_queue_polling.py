"""Gradio's queue polls every 10 ms, not every 1 ms: an idle server no longer wakes its event loop ~1,100 times a second."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import gradio as gr
import pytest

from chat_app.ui.queue_polling import EVENTS_POLL_S, PROGRESS_POLL_S, calm_queue_polling
from scripts.bench_sessions import app_page


def polls_in(queue, seconds: float) -> int:
    """How many times the queue's processing loop looks for events while idle for `seconds`."""
    looks = 0
    original = type(queue).__len__

    class Counting(type(queue)):
        def __len__(self) -> int:
            nonlocal looks
            looks += 1
            return original(self)

    async def run() -> None:
        queue.__class__ = Counting
        task = asyncio.create_task(queue.start_processing())
        await asyncio.sleep(seconds)
        queue.stopped = True
        await task

    try:
        asyncio.run(run())
    finally:
        queue.__class__ = Counting.__mro__[1]
        queue.stopped = False
    return looks


def test_the_apps_idle_queue_looks_for_events_at_most_every_10_ms(tiny_model_path: Path, tmp_path: Path) -> None:
    queue = app_page(tiny_model_path, tmp_path)._queue
    assert queue.sleep_when_free == EVENTS_POLL_S and queue.progress_update_sleep_when_free == PROGRESS_POLL_S
    start = time.monotonic()
    looks = polls_in(queue, 0.5)
    elapsed = time.monotonic() - start
    # Gradio's own 1 ms would look ~500 times; a loaded machine only makes it fewer.
    assert 1 <= looks <= elapsed / EVENTS_POLL_S + 5


def test_a_gradio_without_those_settings_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    demo._queue.sleep_when_free = 0.5  # slower than ours already: kept
    assert calm_queue_polling(demo)
    assert demo._queue.sleep_when_free == 0.5 and demo._queue.progress_update_sleep_when_free == PROGRESS_POLL_S
    del demo._queue.progress_update_sleep_when_free  # a Gradio that polls in some other way
    assert not calm_queue_polling(demo)
    assert "polls at its own rate" in caplog.text
