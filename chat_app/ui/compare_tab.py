"""The Compare tab: two anonymous replies side by side, a vote, then the versions are revealed."""

from __future__ import annotations

import time

import gradio as gr

from .chat_tab import STREAM_INTERVAL_S
from .common import Runtime, sampling_from, show_error, user_id_for

CHOICES = {"A is better": "A", "B is better": "B", "Tie": "tie", "Both are bad": "both_bad"}


def build_compare_tab(rt: Runtime, user_state: gr.State, settings: dict) -> None:
    battle_state = gr.State(None)  # the battle's key (its prompt message id)
    gr.Markdown("Ask one thing and get two replies from two model versions. Pick the better one; "
                "we tell you which versions they were after you vote.")
    with gr.Row():
        prompt = gr.Textbox(placeholder="Your prompt", show_label=False, scale=6, elem_id="compare-input")
        go = gr.Button("Get two replies", variant="primary", scale=1, elem_id="compare-go")
    with gr.Row():
        reply_a = gr.Textbox(label="Reply A", lines=10, interactive=False, elem_id="compare-a")
        reply_b = gr.Textbox(label="Reply B", lines=10, interactive=False, elem_id="compare-b")
    with gr.Row():
        buttons = [gr.Button(label, interactive=False, elem_id=f"vote-{value}") for label, value in CHOICES.items()]
    reveal = gr.Markdown("", elem_id="compare-reveal")

    async def on_go(text, uid, system_prompt, temperature, top_p, max_tokens, request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        locked = [gr.Button(interactive=False)] * len(buttons)
        try:
            last_sent = 0.0
            async for battle in svc.battle(uid, text, system_prompt=system_prompt or None,
                                           sampling=sampling_from(temperature, top_p, max_tokens)):
                if not battle.done and time.monotonic() - last_sent < STREAM_INTERVAL_S:
                    continue
                last_sent = time.monotonic()
                yield [battle.texts[0], battle.texts[1], battle.user_message_id, uid, ""] + locked
        except Exception as exc:
            raise show_error(exc) from exc

    def on_done(key):
        # Runs after the stream ends (`.then`): enable voting once both replies are stored.
        if key is None:
            return [gr.skip()] * (2 + len(buttons))
        battle = rt.require().get_battle(key)
        ready = battle.done and 0 not in battle.reply_ids
        return [battle.texts[0], battle.texts[1]] + [gr.Button(interactive=ready)] * len(buttons)

    def on_vote(label: str):
        def vote(key, uid, request: gr.Request):
            svc = rt.require()
            uid = svc.ensure_user(user_id_for(request, uid))
            if key is None:
                raise gr.Error("Get two replies first.")
            try:
                versions = svc.vote(uid, int(key), CHOICES[label])
            except Exception as exc:
                raise show_error(exc) from exc
            text = f"Thanks! **A** was `{versions[0]}`, **B** was `{versions[1]}`."
            return [text, None] + [gr.Button(interactive=False)] * len(buttons)
        return vote

    settings_inputs = [settings["system_prompt"], settings["temperature"], settings["top_p"], settings["max_tokens"]]
    go_event = dict(fn=on_go, inputs=[prompt, user_state] + settings_inputs,
                    outputs=[reply_a, reply_b, battle_state, user_state, reveal] + buttons)
    go.click(**go_event, api_name="compare").then(on_done, [battle_state], [reply_a, reply_b] + buttons,
                                                  api_name=False)
    prompt.submit(**go_event, api_name=False).then(on_done, [battle_state], [reply_a, reply_b] + buttons,
                                                   api_name=False)
    for button, (label, value) in zip(buttons, CHOICES.items()):
        button.click(on_vote(label), [battle_state, user_state], [reveal, battle_state] + buttons,
                     api_name=f"vote_{value}")
