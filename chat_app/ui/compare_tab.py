"""The Compare tab: two anonymous replies side by side, a vote, then the versions are revealed."""

from __future__ import annotations

import gradio as gr

from ..limits import UserFacingError
from ..runtime import Runtime
from .common import STREAM_PACER, sampling_from, user_handler

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
    next_battle = gr.Button("Next battle", visible=False, elem_id="compare-next")

    @user_handler(rt)
    async def on_go(svc, who, text, system_prompt, temperature, top_p, max_tokens, frequency_penalty, min_p):
        locked = [gr.Button(interactive=False, variant="secondary")] * len(buttons)
        stream = svc.battle(who.user_id, text, system_prompt=system_prompt or None,
                            sampling=sampling_from(temperature, top_p, max_tokens, frequency_penalty, min_p), client=who.address)
        async for battle in STREAM_PACER.paced(stream, lambda b: b.done, lambda b: any(b.texts)):
            yield [battle.texts[0], battle.texts[1], battle.user_message_id, who.user_id, ""] + locked

    @user_handler(rt)
    def on_done(svc, who, key):
        # Runs after the stream ends (`.then`): enable voting once both replies are stored.
        if key is None:
            return [gr.skip()] * (2 + len(buttons))
        battle = svc.get_battle(key)
        ready = battle.done and 0 not in battle.reply_ids
        return [battle.texts[0], battle.texts[1]] + [gr.Button(interactive=ready)] * len(buttons)

    def on_vote(label: str):
        @user_handler(rt)
        def vote(svc, who, key):
            if key is None:
                raise UserFacingError("Get two replies first.")
            versions = svc.vote(who.user_id, int(key), CHOICES[label], client=who.address)
            text = f"You voted **{label}**. Thanks! **A** was `{versions[0]}`, **B** was `{versions[1]}`."
            shown = [gr.Button(interactive=False, variant="primary" if other == label else "secondary")
                     for other in CHOICES]
            return [text, None] + shown + [gr.Button(visible=True)]
        return vote

    def on_next():
        """A new battle: the prompt box, the replies and the verdict cleared."""
        return ["", "", "", "", gr.Button(visible=False)] + [gr.Button(interactive=False, variant="secondary")] * len(buttons)

    settings_inputs = [settings[k] for k in ("system_prompt", "temperature", "top_p", "max_tokens", "frequency_penalty", "min_p")]
    go_event = dict(fn=on_go, inputs=[prompt] + settings_inputs + [user_state],
                    outputs=[reply_a, reply_b, battle_state, user_state, reveal] + buttons)
    done = dict(fn=on_done, inputs=[battle_state, user_state], outputs=[reply_a, reply_b] + buttons, api_name=False)
    go.click(**go_event, api_name="compare").then(**done)
    prompt.submit(**go_event, api_name=False).then(**done)
    for button, (label, value) in zip(buttons, CHOICES.items()):
        button.click(on_vote(label), [battle_state, user_state], [reveal, battle_state] + buttons + [next_battle],
                     api_name=f"vote_{value}")
    next_battle.click(on_next, None, [prompt, reply_a, reply_b, reveal, next_battle] + buttons, api_name=False)
