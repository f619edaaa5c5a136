"""The Chat tab: multi-turn streaming chat with thumbs, reasons, and "write a better reply"."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from ..identity import Caller
from ..limits import UserFacingError
from ..service import ChatService
from .common import THUMBS_DOWN_REASONS, THUMBS_UP_REASONS, Runtime, sampling_from, throttled, user_handler
from .rendering import for_display


def _empty_state() -> dict:
    # ids[i] is the database id of history[i]; `selected` is the reply the feedback panel acts on;
    # `saved` is the last feedback stored, so pressing the same button twice stores it once.
    return {"conversation_id": None, "ids": [], "selected": None, "thumb": 0, "saved": None}


GENERATING = "_generating…_"  # the status line while a reply streams
STOPPED = "⏹ Stopped: the reply above is cut short, so it cannot be rated. Regenerate for a whole one."
CUT_OFF = "✂️ The reply reached the token limit and was cut off (raise Max new tokens in Settings)."


def final_status(update) -> str:
    """The status line under a finished reply: the error, else a cut-off warning and any note."""
    if update.error:
        return update.error
    parts = [CUT_OFF] if update.finish_reason == "length" else []
    return "\n\n".join(parts + ([update.note] if update.note else []))


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def browser_value(rt: Runtime, who: Caller, conversation_id: int | None) -> dict:
    """What the browser keeps across reloads: a signed token of an anonymous identity (a logged-in
    user needs none) and the open conversation (checked against the owner whenever it is used)."""
    anonymous = rt.signer.verify(rt.signer.token(who.user_id)) is not None
    return {"token": rt.signer.token(who.user_id) if anonymous else None, "conversation_id": conversation_id}


def conversation_view(svc: ChatService, who: Caller, conversation_id: int) -> tuple[list[dict], dict]:
    """(chatbot history, tab state) of a conversation the caller owns, as stored (its latest branch)."""
    convs = {c["id"] for c in svc.store.conversations_of(who.user_id, limit=1000)}
    if conversation_id not in convs:
        raise UserFacingError("That conversation is not yours, or no longer exists.")
    branch = svc.store.latest_branch(conversation_id)
    history, ids = [], branch.message_ids if branch else []
    for message, message_id in zip(branch.messages if branch else [], ids):
        text = message["content"]
        if message["role"] == "assistant" and not text.strip():
            reason = svc.store.message(message_id)["finish_reason"]
            text = ("⚠️ The model could not answer this; press Regenerate." if reason == "error"
                    else "(empty reply)")
        history.append({"role": message["role"], "content": for_display(message["role"], text)})
    return history, {**_empty_state(), "conversation_id": conversation_id, "ids": ids}


@dataclass
class ChatTab:
    """What the page-load handler needs to restore the last conversation."""

    chatbot: gr.Chatbot
    state: gr.State
    restore: Callable


def build_chat_tab(rt: Runtime, user_state: gr.State, browser: gr.BrowserState, settings: dict) -> ChatTab:
    conv_state = gr.State(_empty_state())
    with gr.Row():
        with gr.Column(scale=1, min_width=200):
            new_chat = gr.Button("+ New chat", variant="secondary", elem_id="chat-new")
            history_pick = gr.Dropdown(label="Your conversations", choices=[], value=None, interactive=True)
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="alignloop", height=460, sanitize_html=True, elem_id="chatbot",
                                 placeholder="Ask anything. Rate replies with 👍 / 👎 to teach the model.")
            with gr.Row():
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="chat-input", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            with gr.Row():
                stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
                regen = gr.Button("Regenerate", scale=1, elem_id="chat-regenerate")
            status = gr.Markdown("", elem_id="chat-status")
            with gr.Accordion("Feedback on the selected reply", open=False, elem_id="feedback-panel") as panel:
                selected_md = gr.Markdown("Click 👍 or 👎 under a reply to select it.")
                reasons = gr.CheckboxGroup(THUMBS_UP_REASONS + THUMBS_DOWN_REASONS, label="Reasons (optional)")
                comment = gr.Textbox(label="Comment (optional)", lines=2)
                save_feedback = gr.Button("Save feedback", elem_id="feedback-save")
            with gr.Accordion("Write a better reply", open=False, elem_id="better-panel"):
                better = gr.Textbox(label="Your ideal reply to the last message", lines=4, elem_id="better-reply")
                save_better = gr.Button("Save as demonstration", elem_id="better-save")

    sampling_inputs = [settings[k] for k in ("system_prompt", "temperature", "top_p", "max_tokens", "frequency_penalty")]

    @user_handler(rt)
    async def on_send(svc, who, text, history, state, system_prompt, temperature, top_p, max_tokens, frequency_penalty):
        history = list(history or [])
        base_ids = list(state["ids"])
        parent = base_ids[-1] if base_ids else None
        stream = svc.chat(who.user_id, text, conversation_id=state["conversation_id"], parent_id=parent,
                          system_prompt=system_prompt or None, sampling=sampling_from(temperature, top_p, max_tokens, frequency_penalty),
                          client=who.address)
        started = False
        async for update in throttled(stream, lambda u: u.finished):
            if not started:  # the user's turn is shown once the server has accepted it
                history += [{"role": "user", "content": for_display("user", text)}, {"role": "assistant", "content": ""}]
                started = True
            history[-1] = {"role": "assistant", "content": for_display("assistant", update.error or update.text)}
            # The reply id reaches the page through `.then(sync_from_db)`: a streamed
            # update can be overtaken, the database cannot.
            state = {**state, "conversation_id": update.conversation_id,
                     "ids": base_ids + [update.user_message_id, update.reply_id]}
            yield "", history, state, who.user_id, browser_value(rt, who, update.conversation_id), \
                final_status(update) if update.finished else GENERATING

    @user_handler(rt)
    async def on_regenerate(svc, who, history, state, system_prompt, temperature, top_p, max_tokens, frequency_penalty):
        if len(state["ids"]) < 2:
            raise UserFacingError("Nothing to regenerate yet: send a message first.")
        history, ids = list(history)[:-1], state["ids"][:-1]  # drop the last reply; keep its user turn
        history.append({"role": "assistant", "content": ""})
        stream = svc.regenerate(who.user_id, ids[-1], sampling=sampling_from(temperature, top_p, max_tokens, frequency_penalty),
                                client=who.address)
        async for update in throttled(stream, lambda u: u.finished):
            history[-1] = {"role": "assistant", "content": for_display("assistant", update.error or update.text)}
            state = {**state, "ids": ids + [update.reply_id]}
            yield history, state, final_status(update) if update.finished else GENERATING

    @user_handler(rt)
    def on_like(svc, who, data: gr.LikeData, state):
        index = data.index if isinstance(data.index, int) else data.index[0]
        if not isinstance(index, int) or not 0 <= index < len(state["ids"]) or state["ids"][index] is None:
            raise UserFacingError("That reply is not saved yet; wait until it has finished.")
        value = 1 if data.liked is True else -1 if data.liked is False else 0
        key = ("like", state["ids"][index], value)
        if state["saved"] != key:  # the same click twice stores one rating
            svc.rate(who.user_id, state["ids"][index], value, client=who.address)
        state = {**state, "selected": state["ids"][index], "thumb": value, "saved": key}
        label = {1: "👍", -1: "👎", 0: "no rating"}[value]
        return state, f"Selected reply #{index // 2 + 1}: {label}. Add reasons or a comment below.", \
            gr.Accordion(open=value != 0)

    @user_handler(rt)
    def on_save_feedback(svc, who, state, tags, text):
        if state["selected"] is None:
            raise UserFacingError("Click 👍 or 👎 under a reply first.")
        key = ("feedback", state["selected"], state["thumb"], tuple(tags or ()), text or "")
        if state["saved"] != key:  # "Save feedback" twice stores one rating
            svc.rate(who.user_id, state["selected"], state["thumb"], reasons=tags, comment=text, client=who.address)
        gr.Info("Thanks! Your feedback was saved.")
        return [], "", {**state, "saved": key}

    @user_handler(rt)
    def on_save_better(svc, who, state, text):
        if len(state["ids"]) < 2:
            raise UserFacingError("Send a message first; the ideal reply answers your last message.")
        # The same text for the same turn twice is one demonstration.
        svc.demonstrate(who.user_id, state["ids"][-2], text, replaces_reply_id=state["ids"][-1], client=who.address,
                        client_id=f"demo:{_digest(who.user_id, state['ids'][-2], text)}")
        gr.Info("Thanks! Your reply was saved as a demonstration for training.")
        return ""

    def on_new_chat():
        return [], _empty_state(), "", gr.skip()

    @user_handler(rt)
    def list_conversations(svc, who):
        convs = svc.store.conversations_of(who.user_id, limit=200, source="chat")
        return gr.Dropdown(choices=[(f"#{c['id']} {c['title'] or ''}", c["id"]) for c in convs])

    def restore(svc: ChatService, who: Caller, conversation_id: int) -> tuple[list[dict], dict, dict]:
        history, state = conversation_view(svc, who, conversation_id)
        return history, state, browser_value(rt, who, conversation_id)

    @user_handler(rt)
    def load_conversation(svc, who, conversation_id):
        if conversation_id is None:
            return gr.skip(), gr.skip(), gr.skip()
        return restore(svc, who, int(conversation_id))

    @user_handler(rt)
    def sync_from_db(svc, who, state, shown_status):
        """After a reply finished (or was stopped): show the conversation as stored, with its ids; a
        status still saying "generating" means the reply was stopped, and says so; a note or error is kept."""
        status = STOPPED if shown_status == GENERATING else gr.skip()
        if not state or state.get("conversation_id") is None:
            return gr.skip(), gr.skip(), status
        history, new_state = conversation_view(svc, who, state["conversation_id"])
        return history, {**new_state, "saved": state.get("saved")}, status

    outputs = [box, chatbot, conv_state, user_state, browser, status]
    send_inputs = [box, chatbot, conv_state] + sampling_inputs + [user_state]
    # No progress overlay on the chat: the streamed reply and the status line show progress, and a
    # refused message (a toast) must not leave a red "Error" over the conversation and the input box.
    quiet = dict(show_progress="hidden")
    send_event = send.click(on_send, send_inputs, outputs, api_name="chat", **quiet)
    submit_event = box.submit(on_send, send_inputs, outputs, api_name=False, **quiet)
    regen_event = regen.click(on_regenerate, [chatbot, conv_state] + sampling_inputs + [user_state],
                              [chatbot, conv_state, status], api_name="regenerate", **quiet)
    synced = [chatbot, conv_state, status]
    for event in (send_event, submit_event, regen_event):
        event.then(sync_from_db, [conv_state, status, user_state], synced, api_name=False)
    stop.click(None, None, None, cancels=[send_event, submit_event, regen_event]).then(
        sync_from_db, [conv_state, status, user_state], synced, api_name=False)
    chatbot.like(on_like, [conv_state, user_state], [conv_state, selected_md, panel], api_name="like")
    save_feedback.click(on_save_feedback, [conv_state, reasons, comment, user_state], [reasons, comment, conv_state],
                        api_name="feedback")
    save_better.click(on_save_better, [conv_state, better, user_state], [better], api_name="demonstrate")
    new_chat.click(on_new_chat, None, [chatbot, conv_state, status, history_pick], api_name=False)
    history_pick.focus(list_conversations, [user_state], [history_pick], api_name=False)
    history_pick.select(load_conversation, [history_pick, user_state], [chatbot, conv_state, browser],
                        api_name="load_conversation")
    return ChatTab(chatbot, conv_state, restore)
