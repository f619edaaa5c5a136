"""Lean Gradio sessions: a new browser session renders no block configs, yet describes the page as Gradio's own."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from fastapi import FastAPI
from gradio.blocks import BlocksConfig
from gradio.state_holder import SessionState, StateHolder

from chat_app.ui.session_state import LeanSessionState, LeanStateHolder, use_lean_sessions
from scripts.bench_sessions import app_page


def count_renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the blocks whose config Gradio renders from now on."""
    rendered: list[int] = []
    original = BlocksConfig.config_for_block

    def spy(_id, rendered_ids, block, renderable=None):
        rendered.append(_id)
        return original(_id, rendered_ids, block, renderable)

    monkeypatch.setattr(BlocksConfig, "config_for_block", staticmethod(spy))
    return rendered


def small_page() -> gr.Blocks:
    with gr.Blocks() as demo:
        state = gr.State({"n": 0})
        box = gr.Textbox("hello", label="Box")
        gr.Slider(0, 10, value=3, label="Slider")
        gr.Markdown("# title")
        out = gr.Chatbot()
        box.submit(lambda text, s: ([{"role": "user", "content": text}], s), [box, state], [out, state])
    gr.mount_gradio_app(FastAPI(), demo, path="")
    return demo


def describe(session: SessionState) -> list[dict]:
    return sorted(session.components, key=lambda config: config["id"])


def test_the_apps_new_sessions_render_no_block_config(tiny_model_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio's own state holder renders all 145 of the page's blocks for every new session (page view,
    or raw queue/join from a new session hash); the app's renders none until a block is updated."""
    holder = app_page(tiny_model_path, tmp_path).state_holder
    assert type(holder) is LeanStateHolder
    assert len(holder.blocks.blocks) > 100

    rendered = count_renders(monkeypatch)
    session = holder["a-new-session"]
    assert isinstance(session, LeanSessionState) and rendered == []
    stock = SessionState(holder.blocks)
    assert len(rendered) >= len(holder.blocks.blocks) - 1  # Gradio's own: every block
    assert holder["a-new-session"] is session  # the same session on its next call
    assert describe(session) == describe(stock)


def test_a_lean_session_describes_the_page_as_gradios_own_after_updates() -> None:
    demo = small_page()
    assert use_lean_sessions(demo) and type(demo.state_holder) is LeanStateHolder
    lean, stock = demo.state_holder["lean"], SessionState(demo)
    assert isinstance(lean, LeanSessionState)
    ids = {type(block).__name__: key for key, block in demo.blocks.items()}
    for session in (lean, stock):  # what Gradio does with an event's inputs and outputs
        session._update_value_in_config(ids["Textbox"], "typed")
        session[ids["State"]] = {"n": 1}
        session._update_value_in_config(ids["Chatbot"], [{"role": "user", "content": "typed"}])
    assert lean[ids["State"]] == stock[ids["State"]] == {"n": 1}
    assert describe(lean) == describe(stock)
    assert {c["id"] for c in describe(lean)} == set(demo.blocks)


def test_gradio_keeps_its_own_sessions_where_lean_ones_do_not_fit(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A Gradio whose SessionState needs more of the Blocks than the lean one gives it: left as it is."""
    original = SessionState.__init__

    def needs_more(self, blocks):
        original(self, blocks)
        self.fns = blocks.fns  # an attribute the lean constructor's stand-in lacks

    monkeypatch.setattr(SessionState, "__init__", needs_more)
    demo = small_page()
    assert not use_lean_sessions(demo)
    assert type(demo.state_holder) is StateHolder
    assert "lean sessions do not work with this Gradio" in caplog.text
    assert not isinstance(demo.state_holder["s"], LeanSessionState)
