"""`build_ui`: the tabs assembled into one gr.Blocks page."""

from __future__ import annotations

import gradio as gr

from ..engines.base import SamplingConfig
from .chat_tab import build_chat_tab
from .common import Runtime, user_id_for
from .compare_tab import build_compare_tab
from .dashboard_tab import build_dashboard_tab
from .rank_tab import build_rank_tab


def build_ui(rt: Runtime, *, title: str = "alignloop", default_sampling: SamplingConfig | None = None,
             concurrency: int | None = 64) -> gr.Blocks:
    """The whole app: Chat, Compare, Rank and (for operators) Dashboard.

    `concurrency`: requests of one kind (e.g. chat) handled at once (None: no limit).
    """
    defaults = default_sampling or SamplingConfig()
    with gr.Blocks(title=title) as demo:
        # The anonymous user id and the open conversation survive a page reload.
        browser = gr.BrowserState({"user_id": None, "conversation_id": None}, storage_key="alignloop")
        user_state = gr.State(None)
        gr.Markdown(f"# {title}\nA model that learns from you: rate replies, compare, rank, "
                    "or write the reply you wanted.")
        with gr.Accordion("Settings: system prompt and sampling", open=False):
            settings = {
                "system_prompt": gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt"),
                "temperature": gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature"),
                "top_p": gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
                "max_tokens": gr.Slider(8, 1024, value=defaults.max_tokens, step=8, label="Max new tokens"),
            }
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat = build_chat_tab(rt, user_state, browser, settings)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(rt, user_state, settings)
            with gr.Tab("Rank", id="rank"):
                build_rank_tab(rt, user_state, settings)
            with gr.Tab("Dashboard", id="dashboard"):
                build_dashboard_tab(rt)

        def on_load(saved, request: gr.Request):
            saved = saved or {}
            uid = user_id_for(request, saved.get("user_id"))
            if rt.service is not None:
                rt.service.ensure_user(uid)
                agent = request.headers.get("user-agent") if request is not None else None
                rt.service.store.start_session(uid, user_agent=(agent or "")[:300] or None)
            history, state = [], gr.skip()
            if rt.service is not None and saved.get("conversation_id") and saved.get("user_id") == uid:
                try:
                    history, state, _ = chat.restore(saved["conversation_id"], uid, request)
                except gr.Error:
                    history = []
            return uid, {"user_id": uid, "conversation_id": saved.get("conversation_id")}, history, state

        demo.load(on_load, [browser], [user_state, browser, chat.chatbot, chat.state], api_name=False)
    # Gradio runs one call per event at a time unless told otherwise; the engine batches
    # concurrent requests itself (vLLM) or queues them (transformers), so let them through.
    demo.queue(default_concurrency_limit=concurrency)
    return demo
