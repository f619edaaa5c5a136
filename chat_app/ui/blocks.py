"""`build_ui`: the tabs assembled into one gr.Blocks page."""

from __future__ import annotations

import hashlib
import hmac

import gradio as gr

from ..engines.base import SamplingConfig
from ..limits import UserFacingError
from ..runtime import Runtime
from .chat_tab import browser_value, build_chat_tab
from .compare_tab import build_compare_tab
from .dashboard_tab import build_dashboard_tab
from .queue_polling import calm_queue_polling
from .rank_tab import build_rank_tab
from .rendering import banner_text


# A refused message shows as a toast; Gradio would also lay a red "Error" over every output of the
# event (the whole conversation), which hides it and blocks typing until dismissed.
BANNER_REFRESH_S = 5.0

CSS = """
#chat-stop { display: none; }
#reply-pos { text-align: center; }
#chatbot > .wrap:has(.error), #chat-input > .wrap:has(.error), #chat-status > .wrap:has(.error) { display: none !important; }
"""


def build_ui(rt: Runtime, *, title: str = "alignloop", default_sampling: SamplingConfig | None = None,
             concurrency: int | None = 64) -> gr.Blocks:
    """The whole app: Chat, Compare, Rank and (for operators) Dashboard.

    `concurrency`: requests of one kind (e.g. chat) handled at once (None: no limit).
    """
    defaults = default_sampling or SamplingConfig()
    with gr.Blocks(title=title) as demo:
        # The signed anonymous identity and the open conversation survive a reload and a restart: the
        # browser's (client-side) encryption key is derived from the server's key, so it is the same
        # after a restart. The signature, not that encryption, is what makes the identity unforgeable.
        browser_secret = hmac.new(rt.signer.key_for("browser-state"), b"", hashlib.sha256).hexdigest()[:32]
        browser = gr.BrowserState({"token": None, "conversation_id": None}, storage_key="alignloop",
                                  secret=browser_secret)
        user_state = gr.State(None)  # the caller's identity, held by the server for this session
        gr.Markdown(f"# {title}\nA model that learns from you: rate replies, compare, rank, "
                    "or write the reply you wanted.")
        banner = gr.Markdown("", elem_id="model-banner")
        with gr.Accordion("Settings: system prompt and sampling", open=False):
            settings = {
                "system_prompt": gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt"),
                "temperature": gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature"),
                "top_p": gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
                "max_tokens": gr.Slider(8, 1024, value=defaults.max_tokens, step=8, label="Max new tokens"),
                "frequency_penalty": gr.Slider(0.0, 2.0, value=defaults.frequency_penalty, step=0.05,
                                               label="Frequency penalty: against repeating the reply's own words (0: none)"),
                "min_p": gr.Slider(0.0, 0.5, value=defaults.min_p, step=0.01,
                                   label="Min-p: never sample a token less likely than this share of the likeliest (0: off)"),
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
            """Who this browser is: the login, else the identity its signed token names, else a new one."""
            saved = saved if isinstance(saved, dict) else {}
            nothing = (gr.skip(),) * len(chat.nav)
            if rt.service is None:
                return None, gr.skip(), [], gr.skip(), *nothing
            claimed = rt.signer.verify(saved.get("token"))
            try:
                svc, who = rt.resolve(request, claimed)
            except UserFacingError as exc:
                gr.Warning(str(exc))
                return None, gr.skip(), [], gr.skip(), *nothing
            history, state, nav = [], gr.skip(), nothing
            conversation = saved.get("conversation_id")
            if claimed == who.user_id or getattr(request, "username", None):
                if isinstance(conversation, int):
                    try:
                        history, state, _, *nav = chat.restore(svc, who, conversation)
                    except UserFacingError:
                        conversation = None
            else:
                conversation = None  # another identity's conversation is never shown
            return who.user_id, browser_value(rt, who, conversation), history, state, *nav

        demo.load(on_load, [browser], [user_state, browser, chat.chatbot, chat.state, *chat.nav], api_name=False)

        async def show_banner() -> str:
            """What the page says about the model now: the bare base, and a round training (with its progress)."""
            if rt.service is None:
                return ""
            return banner_text(await rt.service.model_status())

        demo.load(show_banner, None, banner, api_name=False)
        gr.Timer(BANNER_REFRESH_S).tick(show_banner, None, banner, api_name=False, show_progress="hidden")
    # Gradio runs one call per event at a time unless told otherwise; the engine batches
    # concurrent requests itself (vLLM) or queues them (transformers), so let them through.
    demo.queue(default_concurrency_limit=concurrency)
    calm_queue_polling(demo)
    return demo
