"""The Rank tab: K replies to one prompt (K = 2..9), ordered by the user, stored as one ranking."""

from __future__ import annotations

import gradio as gr

from .common import Runtime, sampling_from, show_error, user_id_for

MAX_K = 9


def build_rank_tab(rt: Runtime, user_state: gr.State, settings: dict) -> None:
    rank_state = gr.State(None)  # {"ids": [...]} of the replies shown, in display order
    gr.Markdown("Get several replies to one prompt, then give each a rank: 1 is the best.")
    with gr.Row():
        prompt = gr.Textbox(placeholder="Your prompt", show_label=False, scale=5, elem_id="rank-input")
        k = gr.Slider(2, MAX_K, value=4, step=1, label="Replies", scale=1, elem_id="rank-k")
        go = gr.Button("Get replies", variant="primary", scale=1, elem_id="rank-go")
    rows, replies, ranks = [], [], []
    for i in range(MAX_K):
        with gr.Row(visible=i < 4) as row:
            rows.append(row)
            replies.append(gr.Textbox(label=f"Reply {i + 1}", lines=3, interactive=False, scale=6,
                                      elem_id=f"rank-reply-{i}"))
            ranks.append(gr.Dropdown(choices=[str(j) for j in range(1, 5)], value=None, label="Rank", scale=1,
                                     elem_id=f"rank-pos-{i}"))
    submit = gr.Button("Submit ranking", variant="primary", elem_id="rank-submit")
    result = gr.Markdown("", elem_id="rank-result")

    async def on_go(text, n, uid, system_prompt, temperature, top_p, max_tokens, request: gr.Request):
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        n = int(n)
        try:
            _, ids, texts = await svc.rank_candidates(uid, text, n, system_prompt=system_prompt or None,
                                                      sampling=sampling_from(temperature, top_p, max_tokens))
        except Exception as exc:
            raise show_error(exc) from exc
        choices = [str(j) for j in range(1, n + 1)]
        return ([{"ids": ids}, uid, ""]
                + [gr.Row(visible=i < n) for i in range(MAX_K)]
                + [texts[i] if i < n else "" for i in range(MAX_K)]
                + [gr.Dropdown(choices=choices, value=None) for _ in range(MAX_K)])

    def on_submit(state, uid, p1, p2, p3, p4, p5, p6, p7, p8, p9, request: gr.Request):
        positions = (p1, p2, p3, p4, p5, p6, p7, p8, p9)  # the rank given to each shown reply
        svc = rt.require()
        uid = svc.ensure_user(user_id_for(request, uid))
        if not state:
            raise gr.Error("Get replies first.")
        ids = state["ids"]
        given = positions[: len(ids)]
        if any(p in (None, "") for p in given) or sorted(int(p) for p in given) != list(range(1, len(ids) + 1)):
            raise gr.Error(f"Give each reply a different rank from 1 to {len(ids)}.")
        ordered = [reply for _, reply in sorted(zip((int(p) for p in given), ids))]
        try:
            svc.submit_ranking(uid, ordered)
        except Exception as exc:
            raise show_error(exc) from exc
        return None, f"Thanks! Your ranking of {len(ids)} replies was saved."

    go_inputs = [prompt, k, user_state, settings["system_prompt"], settings["temperature"], settings["top_p"],
                 settings["max_tokens"]]
    go.click(on_go, go_inputs, [rank_state, user_state, result] + rows + replies + ranks, api_name="rank")
    submit.click(on_submit, [rank_state, user_state] + ranks, [rank_state, result], api_name="submit_ranking")
