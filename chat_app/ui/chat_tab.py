"""The Chat tab: multi-turn streaming chat with thumbs, reasons, and "write a better reply"."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from .common import THUMBS_DOWN_REASONS, THUMBS_UP_REASONS, Runtime, sampling_from, show_error, user_id_for


def _empty_state() -> dict:
    # ids[i] is the database id of history[i]; `selected` is the reply the feedback panel acts on.
    return {"conversation_id": None, "ids": [], "selected": None, "thumb": 0}


# Each streamed update sends the whole conversation to the browser: at most one every 50 ms
# keeps that cost off the cores the engine decodes on, without a visible difference.
STREAM_INTERVAL_S = 0.05


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

    sampling_inputs = [settings["system_prompt"], settings["temperature"], settings["top_p"], settings["max_tokens"]]

    async def on_send(text, history, state, uid, system_prompt, temperature, top_p, max_tokens,
                      request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        history = list(history or [])
        base_ids = list(state["ids"])
        parent = base_ids[-1] if base_ids else None
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        try:
            stream = svc.chat(uid, text, conversation_id=state["conversation_id"], parent_id=parent,
                              system_prompt=system_prompt or None,
                              sampling=sampling_from(temperature, top_p, max_tokens))
            last_sent = 0.0
            async for update in stream:
                if not update.finished and time.monotonic() - last_sent < STREAM_INTERVAL_S:
                    continue  # the next update carries this text too
                last_sent = time.monotonic()
                history[-1] = {"role": "assistant", "content": update.error or update.text}
                # The reply id reaches the page through `.then(sync_from_db)`: a streamed
                # update can be overtaken, the database cannot.
                state = {**state, "conversation_id": update.conversation_id,
                         "ids": base_ids + [update.user_message_id, update.reply_id]}
                yield "", history, state, uid, {"user_id": uid, "conversation_id": update.conversation_id}, \
                    (update.error or "") if update.finished else "_generating…_"
        except Exception as exc:
            raise show_error(exc) from exc

    async def on_regenerate(history, state, uid, system_prompt, temperature, top_p, max_tokens,
                            request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        if len(state["ids"]) < 2:
            raise gr.Error("Nothing to regenerate yet: send a message first.")
        history, ids = list(history)[:-1], state["ids"][:-1]  # drop the last reply; keep its user turn
        history.append({"role": "assistant", "content": ""})
        try:
            last_sent = 0.0
            async for update in svc.regenerate(uid, ids[-1], sampling=sampling_from(temperature, top_p, max_tokens)):
                if not update.finished and time.monotonic() - last_sent < STREAM_INTERVAL_S:
                    continue
                last_sent = time.monotonic()
                history[-1] = {"role": "assistant", "content": update.error or update.text}
                state = {**state, "ids": ids + [update.reply_id]}
                yield history, state, (update.error or "") if update.finished else "_generating…_"
        except Exception as exc:
            raise show_error(exc) from exc

    def on_like(data: gr.LikeData, state, uid, request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(state["ids"]) or state["ids"][index] is None:
            raise gr.Error("That reply is not saved yet; wait until it has finished.")
        value = 1 if data.liked is True else -1 if data.liked is False else 0
        try:
            rt.require().rate(uid, state["ids"][index], value)
        except Exception as exc:
            raise show_error(exc) from exc
        state = {**state, "selected": state["ids"][index], "thumb": value}
        label = {1: "👍", -1: "👎", 0: "no rating"}[value]
        return state, f"Selected reply #{index // 2 + 1}: {label}. Add reasons or a comment below.", \
            gr.Accordion(open=value != 0)

    def on_save_feedback(state, uid, tags, text, request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        if state["selected"] is None:
            raise gr.Error("Click 👍 or 👎 under a reply first.")
        try:
            svc.rate(uid, state["selected"], state["thumb"], reasons=tags, comment=text)
        except Exception as exc:
            raise show_error(exc) from exc
        gr.Info("Thanks! Your feedback was saved.")
        return [], ""

    def on_save_better(state, uid, text, request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        if len(state["ids"]) < 2:
            raise gr.Error("Send a message first; the ideal reply answers your last message.")
        try:
            svc.demonstrate(uid, state["ids"][-2], text, replaces_reply_id=state["ids"][-1])
        except Exception as exc:
            raise show_error(exc) from exc
        gr.Info("Thanks! Your reply was saved as a demonstration for training.")
        return ""

    def on_new_chat():
        return [], _empty_state(), "", gr.skip()

    def list_conversations(uid, request: gr.Request):
        svc = rt.service
        if svc is None:
            return gr.Dropdown(choices=[])
        uid = user_id_for(request, uid)
        convs = [c for c in svc.store.conversations_of(uid) if c["source"] == "chat"]
        return gr.Dropdown(choices=[(f"#{c['id']} {c['title'] or ''}", c["id"]) for c in convs])

    def load_conversation(conversation_id, uid, request: gr.Request):
        svc = rt.require()
        uid = user_id_for(request, uid)
        if conversation_id is None:
            return gr.skip(), gr.skip(), gr.skip()
        convs = {c["id"] for c in svc.store.conversations_of(uid, limit=1000)}
        if conversation_id not in convs:
            raise gr.Error("That conversation is not yours.")
        branch = svc.store.latest_branch(conversation_id)
        history = [{"role": m["role"], "content": m["content"]} for m in (branch.messages if branch else [])]
        for i, message_id in enumerate(branch.message_ids if branch else []):
            if history[i]["role"] == "assistant" and not history[i]["content"].strip():
                reason = svc.store.message(message_id)["finish_reason"]
                history[i]["content"] = ("⚠️ The model could not answer this; press Regenerate." if reason == "error"
                                         else "(empty reply)")
        state = {**_empty_state(), "conversation_id": conversation_id, "ids": branch.message_ids if branch else []}
        return history, state, {"user_id": uid, "conversation_id": conversation_id}

    def sync_from_db(state, uid, request: gr.Request):
        """After a reply finished (or was stopped): show the conversation as stored, with its ids."""
        if rt.service is None or state.get("conversation_id") is None:
            return gr.skip(), gr.skip()
        history, new_state, _ = load_conversation(state["conversation_id"], uid, request)
        return history, new_state

    outputs = [box, chatbot, conv_state, user_state, browser, status]
    send_event = send.click(on_send, [box, chatbot, conv_state, user_state] + sampling_inputs, outputs,
                            api_name="chat")
    submit_event = box.submit(on_send, [box, chatbot, conv_state, user_state] + sampling_inputs, outputs,
                              api_name=False)
    regen_event = regen.click(on_regenerate, [chatbot, conv_state, user_state] + sampling_inputs,
                              [chatbot, conv_state, status], api_name="regenerate")
    for event in (send_event, submit_event, regen_event):
        event.then(sync_from_db, [conv_state, user_state], [chatbot, conv_state], api_name=False)
    stop.click(None, None, None, cancels=[send_event, submit_event, regen_event]).then(
        sync_from_db, [conv_state, user_state], [chatbot, conv_state], api_name=False)
    chatbot.like(on_like, [conv_state, user_state], [conv_state, selected_md, panel], api_name="like")
    save_feedback.click(on_save_feedback, [conv_state, user_state, reasons, comment], [reasons, comment],
                        api_name="feedback")
    save_better.click(on_save_better, [conv_state, user_state, better], [better], api_name="demonstrate")
    new_chat.click(on_new_chat, None, [chatbot, conv_state, status, history_pick], api_name=False)
    history_pick.focus(list_conversations, [user_state], [history_pick], api_name=False)
    history_pick.select(load_conversation, [history_pick, user_state], [chatbot, conv_state, browser],
                        api_name="load_conversation")
    return ChatTab(chatbot, conv_state, load_conversation)
