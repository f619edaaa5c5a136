"""The Chat tab: multi-turn streaming chat with thumbs, reasons, and "write a better reply"."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from feedback_db import FeedbackError

from ..identity import Caller
from ..limits import UserFacingError
from ..service import ChatService, StreamUpdate
from ..runtime import Runtime
from .common import STREAM_PACER, THUMBS_DOWN_REASONS, THUMBS_UP_REASONS, sampling_from, user_handler
from .rendering import for_display


def _empty_state() -> dict:
    # ids[i] is the database id of history[i]; `selected` is the reply the feedback panel acts on;
    # `saved` is the last feedback stored, so pressing the same button twice stores it once.
    return {"conversation_id": None, "ids": [], "selected": None, "thumb": 0, "saved": None}


# While a reply streams, Send becomes Stop, in the browser (CSS hides Stop). SHOW_STOP runs before the
# request is sent (it passes the inputs through), so a quick refusal cannot restore Send before it hides.
SHOW_STOP = ("(...inputs) => { for (const [id, shown] of [['chat-send', 'none'], ['chat-stop', 'flex']]) {"
             " const el = document.getElementById(id); if (el) el.style.display = shown; } return inputs; }")
SHOW_SEND = ("() => { for (const id of ['chat-send', 'chat-stop']) {"
             " const el = document.getElementById(id); if (el) el.style.display = ''; } }")

GENERATING = "_generating…_"  # the status line while a reply streams
STOPPED = "⏹ Stopped: the reply above is cut short, so it cannot be rated. Regenerate for a whole one."
CUT_OFF = "✂️ The reply reached the token limit and was cut off (raise Max new tokens in Settings)."


def paced(stream: AsyncIterator[StreamUpdate]) -> AsyncIterator[StreamUpdate]:
    """A reply's updates as the page gets them (StreamPacer: the first token and the end never held)."""
    return STREAM_PACER.paced(stream, lambda u: u.finished, lambda u: bool(u.text or u.error))


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


def conversation_view(svc: ChatService, who: Caller, conversation_id: int,
                      leaf: int | None = None) -> tuple[gr.Chatbot, dict]:
    """(the chatbot, tab state) of a conversation the caller owns, as stored: the branch from its root to
    `leaf` (default: its newest message, i.e. the latest branch), each reply showing the caller's 👍/👎."""
    try:
        svc.store.owned_conversation(who.user_id, conversation_id)
    except FeedbackError:
        raise UserFacingError("That conversation is not yours, or no longer exists.") from None
    if leaf is not None:
        if svc.store.message(leaf)["conversation_id"] != conversation_id:
            raise UserFacingError("That reply is not in this conversation.")
        branch = svc.store.context(leaf)
    else:
        branch = svc.store.latest_branch(conversation_id)
    history, ids = [], branch.message_ids if branch else []
    for message, message_id in zip(branch.messages if branch else [], ids):
        text = message["content"]
        if message["role"] == "assistant" and not text.strip():
            reason = svc.store.message(message_id)["finish_reason"]
            text = ("⚠️ The model could not answer this; press Regenerate." if reason == "error"
                    else "(empty reply)")
        history.append({"role": message["role"], "content": for_display(message["role"], text)})
    rated = svc.store.ratings_by(who.user_id, ids)
    thumbs = [{1: "Like", -1: "Dislike"}.get(rated.get(message_id, 0))
              for message, message_id in zip(branch.messages if branch else [], ids) if message["role"] == "assistant"]
    return gr.Chatbot(value=history, feedback_value=thumbs), \
        {**_empty_state(), "conversation_id": conversation_id, "ids": ids}


def last_turn(svc: ChatService, state: dict) -> tuple[int, int | None] | None:
    """(the user turn the shown chat ends on, the stored reply shown after it), from the server-side ids;
    the reply is None when there is none (a server stopped while answering). None before any exchange."""
    ids = state.get("ids") or []
    if ids and ids[-1] is not None and svc.store.message(ids[-1])["role"] == "user":
        return ids[-1], None
    return (ids[-2], ids[-1]) if len(ids) >= 2 else None


def last_reply_versions(svc: ChatService, state: dict) -> list[int]:
    """The replies to the user message the shown last reply answers (its regenerations), oldest first;
    [] when the conversation does not end with a stored reply."""
    ids = state.get("ids") or []
    return svc.store.sibling_replies(ids[-1]) if len(ids) >= 2 and ids[-1] is not None else []


def reply_nav(svc: ChatService, state: dict) -> tuple[gr.Row, str]:
    """The ‹ i/n › row under the chat: shown when the last reply has been regenerated."""
    versions = last_reply_versions(svc, state)
    if len(versions) < 2:
        return gr.Row(visible=False), ""
    return gr.Row(visible=True), f"reply {versions.index(state['ids'][-1]) + 1} / {len(versions)}"


def conversation_choices(conversations: list[dict]) -> list[tuple[str, int]]:
    """The conversation list's entries: title and when it started (UTC); a title two conversations share
    is told apart by the conversation's number."""
    titles = Counter((c["title"] or "untitled").strip() for c in conversations)
    choices = []
    for c in conversations:
        title = (c["title"] or "untitled").strip()
        label = title if len(title) <= 40 else title[:39] + "…"
        if titles[title] > 1:
            label += f" (#{c['id']})"
        choices.append((f"{label} · {c['created_at'][:16].replace('T', ' ')}", c["id"]))
    return choices


def export_file(svc: ChatService, who: Caller, conversation_id: int, folder: Path) -> Path:
    """Write a conversation (every branch, with model versions and the caller's ratings) to a JSON file."""
    try:
        data = svc.store.export_conversation(who.user_id, conversation_id)
    except FeedbackError:
        raise UserFacingError("That conversation is not yours, or no longer exists.") from None
    path = folder / f"conversation-{conversation_id}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@dataclass
class ChatTab:
    """What the page-load handler needs to restore the last conversation."""

    chatbot: gr.Chatbot
    state: gr.State
    nav: list  # the ‹ i/n › row and its text
    restore: Callable  # (svc, who, conversation_id) -> (history, state, browser value, *nav)


def build_chat_tab(rt: Runtime, user_state: gr.State, browser: gr.BrowserState, settings: dict) -> ChatTab:
    conv_state = gr.State(_empty_state())
    with gr.Row():
        with gr.Column(scale=1, min_width=200):
            new_chat = gr.Button("+ New chat", variant="secondary", elem_id="chat-new")
            history_pick = gr.Dropdown(label="Your conversations", choices=[], value=None, interactive=True,
                                       elem_id="chat-history")
            with gr.Accordion("This conversation", open=False, elem_id="conversation-panel"):
                title_box = gr.Textbox(label="Title", max_lines=1, elem_id="conversation-title")
                rename = gr.Button("Rename", size="sm", elem_id="conversation-rename")
                export = gr.Button("Export (JSON)", size="sm", elem_id="conversation-export")
                export_out = gr.File(label="Download", visible=False, elem_id="conversation-file")
                delete = gr.Button("Delete", size="sm", variant="stop", elem_id="conversation-delete")
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="alignloop", height=460, sanitize_html=True, elem_id="chatbot",
                                 editable="user",
                                 placeholder="Ask anything. Rate replies with 👍 / 👎 to teach the model. "
                                             "Enter sends, Shift+Enter starts a new line; ✏️ edits a sent message.")
            with gr.Row(visible=False, elem_id="reply-nav") as nav_row:
                prev_reply = gr.Button("‹", size="sm", min_width=40, scale=0, elem_id="reply-prev")
                nav_text = gr.Markdown("", elem_id="reply-pos")
                next_reply = gr.Button("›", size="sm", min_width=40, scale=0, elem_id="reply-next")
            with gr.Row():
                box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="chat-input", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                # Send becomes Stop while a reply streams (SHOW_STOP / SHOW_SEND, in the browser).
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
            with gr.Row():
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

    # Exports are written here (one file per conversation, rewritten on each export; Gradio serves a copy).
    export_folder = Path(tempfile.mkdtemp(prefix="alignloop-exports-"))
    sampling_inputs = [settings[k] for k in ("system_prompt", "temperature", "top_p", "max_tokens", "frequency_penalty", "min_p")]

    async def stream_turn(svc, who, text, history, state, base_ids, sampling_values, edits=None):
        """Send `text` after the messages `base_ids` (the history shown for them), or as an edit of the user
        message `edits`, and stream the reply."""
        parent = base_ids[-1] if base_ids else None
        system_prompt, *knobs = sampling_values
        stream = svc.chat(who.user_id, text, conversation_id=state["conversation_id"], parent_id=parent,
                          system_prompt=system_prompt or None, sampling=sampling_from(*knobs), client=who.address,
                          edits=edits)
        started = False
        async for update in paced(stream):
            if not started:  # the user's turn is shown once the server has accepted it (its first update)
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
    async def on_send(svc, who, text, history, state, system_prompt, temperature, top_p, max_tokens, frequency_penalty, min_p):
        async for out in stream_turn(svc, who, text, list(history or []), state, list(state["ids"]),
                                     (system_prompt, temperature, top_p, max_tokens, frequency_penalty, min_p)):
            yield out

    @user_handler(rt)
    async def on_edit(svc, who, data: gr.EditData, history, state, system_prompt, temperature, top_p, max_tokens,
                      frequency_penalty, min_p):
        """A sent message edited in place is sent again as a new branch from the same point: the old
        turn and its replies stay in the stored tree."""
        index = data.index if isinstance(data.index, int) else data.index[0]
        ids = list(state["ids"])
        if not isinstance(index, int) or not 0 <= index < len(ids) or ids[index] is None:
            raise UserFacingError("Only a sent message of yours can be edited; wait until its reply has finished.")
        text = data.value.get("text", "") if isinstance(data.value, dict) else data.value
        if not isinstance(text, str):
            raise UserFacingError("An edited message must be text.")
        async for out in stream_turn(svc, who, text, list(history or [])[:index], state, ids[:index],
                                     (system_prompt, temperature, top_p, max_tokens, frequency_penalty, min_p),
                                     edits=ids[index]):
            yield out

    @user_handler(rt)
    async def on_regenerate(svc, who, history, state, system_prompt, temperature, top_p, max_tokens, frequency_penalty, min_p):
        turn = await asyncio.to_thread(last_turn, svc, state)
        if turn is None:
            raise UserFacingError("Nothing to regenerate yet: send a message first.")
        history, ids = list(history), list(state["ids"])
        if ids[-1] != turn[0]:  # the chat ends on a reply: drop it and keep its user turn (else answer that turn)
            history, ids = history[:-1], ids[:-1]
        history.append({"role": "assistant", "content": ""})
        stream = svc.regenerate(who.user_id, turn[0], sampling=sampling_from(temperature, top_p, max_tokens, frequency_penalty, min_p),
                                client=who.address)
        async for update in paced(stream):
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
        if (last := last_turn(svc, state)) is None:
            raise UserFacingError("Send a message first; the ideal reply answers your last message.")
        turn, replaces = last  # no reply to replace when the server never answered the turn
        # The same text for the same turn twice is one demonstration.
        svc.demonstrate(who.user_id, turn, text, replaces_reply_id=replaces, client=who.address,
                        client_id=f"demo:{_digest(who.user_id, turn, text)}")
        gr.Info("Thanks! Your reply was saved as a demonstration for training.")
        return ""

    def on_new_chat():
        return [], _empty_state(), "", gr.skip(), gr.Row(visible=False), ""

    def history_list(svc: ChatService, who: Caller, **selected: int | None) -> gr.Dropdown:
        """The caller's chat conversations for the history list (their 200 newest); `value=` selects one."""
        return gr.Dropdown(choices=conversation_choices(svc.store.conversations_of(who.user_id, limit=200,
                                                                                   source="chat")), **selected)

    def open_conversation(state: dict) -> int:
        if state.get("conversation_id") is None:
            raise UserFacingError("Open or start a conversation first.")
        return state["conversation_id"]

    @user_handler(rt)
    def list_conversations(svc, who):
        return history_list(svc, who)

    def restore(svc: ChatService, who: Caller, conversation_id: int) -> tuple:
        history, state = conversation_view(svc, who, conversation_id)
        return (history, state, browser_value(rt, who, conversation_id), *reply_nav(svc, state))

    @user_handler(rt)
    def load_conversation(svc, who, conversation_id):
        if conversation_id is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        title = svc.store.owned_conversation(who.user_id, int(conversation_id))["title"] or ""
        return (*restore(svc, who, int(conversation_id)), title)

    @user_handler(rt)
    def sync_from_db(svc, who, state, shown_status):
        """After a reply finished (or was stopped): show the conversation as stored, with its ids; a
        status still saying "generating" means the reply was stopped, and says so; a note or error is kept."""
        status = STOPPED if shown_status == GENERATING else gr.skip()
        if not state or state.get("conversation_id") is None:
            return gr.skip(), gr.skip(), status, gr.skip(), gr.skip()
        leaf = state["ids"][-1] if state.get("ids") and state["ids"][-1] is not None else None
        history, new_state = conversation_view(svc, who, state["conversation_id"], leaf)
        new_state = {**new_state, "saved": state.get("saved")}
        return (history, new_state, status, *reply_nav(svc, new_state))

    def step_reply(offset: int) -> Callable:
        @user_handler(rt)
        def show_sibling(svc, who, state):
            """‹ / ›: show another version of the last reply (a regeneration) in its place; sending next
            continues from the version shown."""
            versions = last_reply_versions(svc, state)
            if len(versions) < 2:
                raise UserFacingError("This reply has no other versions; Regenerate makes one.")
            sibling = versions[(versions.index(state["ids"][-1]) + offset) % len(versions)]
            history, new_state = conversation_view(svc, who, state["conversation_id"], sibling)
            return (history, new_state, *reply_nav(svc, new_state), "")
        return show_sibling

    @user_handler(rt)
    def on_rename(svc, who, state, title):
        conversation_id = open_conversation(state)
        svc.store.rename_conversation(who.user_id, conversation_id, title or "")
        gr.Info("Renamed.")
        return history_list(svc, who, value=conversation_id)

    @user_handler(rt)
    def on_export(svc, who, state):
        return gr.File(value=str(export_file(svc, who, open_conversation(state), export_folder)), visible=True)

    @user_handler(rt)
    def on_delete(svc, who, state):
        svc.store.delete_conversation(who.user_id, open_conversation(state))
        gr.Info("Deleted from your conversations. Ratings you gave in it stay in the training data.")
        return ([], _empty_state(), "", history_list(svc, who, value=None), browser_value(rt, who, None),
                gr.Row(visible=False), "", "", gr.File(value=None, visible=False))

    outputs = [box, chatbot, conv_state, user_state, browser, status]
    send_inputs = [box, chatbot, conv_state] + sampling_inputs + [user_state]
    # No progress overlay on the chat: the streamed reply and the status line show progress, and a
    # refused message (a toast) must not leave a red "Error" over the conversation and the input box.
    quiet = dict(show_progress="hidden")
    quiet = dict(quiet, js=SHOW_STOP)
    send_event = send.click(on_send, send_inputs, outputs, api_name="chat", **quiet)
    submit_event = box.submit(on_send, send_inputs, outputs, api_name=False, **quiet)
    edit_event = chatbot.edit(on_edit, [chatbot, conv_state] + sampling_inputs + [user_state], outputs,
                              api_name="edit", **quiet)
    regen_event = regen.click(on_regenerate, [chatbot, conv_state] + sampling_inputs + [user_state],
                              [chatbot, conv_state, status], api_name="regenerate", **quiet)
    nav = [nav_row, nav_text]
    synced = [chatbot, conv_state, status] + nav
    replies = (send_event, submit_event, edit_event, regen_event)
    for event in replies:
        event.then(sync_from_db, [conv_state, status, user_state], synced, api_name=False).then(
            None, None, None, js=SHOW_SEND)
        event.failure(None, None, None, js=SHOW_SEND)  # a refused message ends the chain above at once
    stop.click(None, None, None, cancels=list(replies)).then(
        sync_from_db, [conv_state, status, user_state], synced, api_name=False).then(None, None, None, js=SHOW_SEND)
    prev_reply.click(step_reply(-1), [conv_state, user_state], [chatbot, conv_state] + nav + [status],
                     api_name="previous_reply")
    next_reply.click(step_reply(+1), [conv_state, user_state], [chatbot, conv_state] + nav + [status],
                     api_name="next_reply")
    chatbot.like(on_like, [conv_state, user_state], [conv_state, selected_md, panel], api_name="like")
    save_feedback.click(on_save_feedback, [conv_state, reasons, comment, user_state], [reasons, comment, conv_state],
                        api_name="feedback")
    save_better.click(on_save_better, [conv_state, better, user_state], [better], api_name="demonstrate")
    new_chat.click(on_new_chat, None, [chatbot, conv_state, status, history_pick] + nav, api_name=False)
    # The chat's own 🗑 empties the view: the next message starts a new conversation (the old one stays listed).
    chatbot.clear(on_new_chat, None, [chatbot, conv_state, status, history_pick] + nav, api_name=False)
    history_pick.focus(list_conversations, [user_state], [history_pick], api_name=False)
    history_pick.select(load_conversation, [history_pick, user_state], [chatbot, conv_state, browser] + nav + [title_box],
                        api_name="load_conversation")
    rename.click(on_rename, [conv_state, title_box, user_state], [history_pick], api_name="rename_conversation")
    export.click(on_export, [conv_state, user_state], [export_out], api_name="export_conversation")
    delete.click(on_delete, [conv_state, user_state],
                 [chatbot, conv_state, status, history_pick, browser] + nav + [title_box, export_out],
                 api_name="delete_conversation")
    return ChatTab(chatbot, conv_state, nav, restore)
