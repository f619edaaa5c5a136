"""The Rank tab: K replies to one prompt (K = 2..9), ordered by the user, stored as one ranking."""

from __future__ import annotations

import gradio as gr

from ..limits import UserFacingError
from ..runtime import Runtime
from .common import STREAM_PACER, sampling_from, user_handler

MAX_K = 9


def _whole_number(value: object) -> int:
    """A rank or a count as the browser sent it ("3", 3 or 3.0), else a refusal."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise UserFacingError("Give each reply a rank (a whole number), and the number of replies as a whole number.")
    return int(number)


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

    @user_handler(rt)
    async def on_go(svc, who, text, n, system_prompt, temperature, top_p, max_tokens, frequency_penalty, min_p):
        n = _whole_number(n)
        stream = svc.rank_stream(who.user_id, text, n, system_prompt=system_prompt or None,
                                 sampling=sampling_from(temperature, top_p, max_tokens, frequency_penalty, min_p),
                                 client=who.address)
        choices = [str(j) for j in range(1, n + 1)]
        rows_shown = [gr.Row(visible=i < n) for i in range(MAX_K)]
        first = True
        async for ranking in STREAM_PACER.paced(stream, lambda r: r.done, lambda r: any(r.texts)):
            ready = ranking.done and 0 not in ranking.reply_ids
            # The replies stream side by side; ranking opens once all K are stored.
            yield ([{"ids": ranking.reply_ids} if ready else None, who.user_id,
                    "" if ranking.done else "_generating…_"]
                   + rows_shown
                   + [ranking.texts[i] if i < n else "" for i in range(MAX_K)]
                   + ([gr.Dropdown(choices=choices, value=None) for _ in range(MAX_K)] if first or ranking.done
                      else [gr.skip()] * MAX_K))
            first = False

    @user_handler(rt)
    def on_submit(svc, who, state, p1, p2, p3, p4, p5, p6, p7, p8, p9):
        positions = (p1, p2, p3, p4, p5, p6, p7, p8, p9)  # the rank given to each shown reply
        if not state:
            raise UserFacingError("Get replies first.")
        ids = state["ids"]
        given = [_whole_number(p) for p in positions[: len(ids)]]
        if sorted(given) != list(range(1, len(ids) + 1)):
            raise UserFacingError(f"Give each reply a different rank from 1 to {len(ids)}.")
        ordered = [reply for _, reply in sorted(zip(given, ids))]
        svc.submit_ranking(who.user_id, ordered, client=who.address)
        return None, f"Thanks! Your ranking of {len(ids)} replies was saved."

    go_inputs = [prompt, k] + [settings[k] for k in ("system_prompt", "temperature", "top_p", "max_tokens",
                                                     "frequency_penalty", "min_p")] + [user_state]
    go.click(on_go, go_inputs, [rank_state, user_state, result] + rows + replies + ranks, api_name="rank")
    submit.click(on_submit, [rank_state] + ranks + [user_state], [rank_state, result], api_name="submit_ranking")
