"""The real embedded Gemma 3 270M (slow): served chat rendering and chunked log-probs over its 262k vocabulary."""

from __future__ import annotations

import pytest
import torch

from training.base_models import load_model_and_tokenizer, prepare_model
from training.chat_data import collate, example_for, stop_token_id
from training.logprobs import token_logprobs


@pytest.mark.slow
def test_real_model_renders_replies_as_served_and_chunked_logprobs_match() -> None:
    model, tok = load_model_and_tokenizer(prepare_model("default"))
    assert tok.convert_ids_to_tokens(stop_token_id(tok)) == "<end_of_turn>"
    prompt = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]
    ex = example_for(tok, prompt, "The capital of France is Paris.", 512)
    served = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "The capital of France is Paris."}],
                                     tokenize=False)
    assert tok.decode(ex.input_ids) == served.rstrip("\n")
    batch = collate([ex, example_for(tok, "Count to five", "1, 2, 3, 4, 5", 512)], tok.pad_token_id)
    with torch.no_grad():
        lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.reply_mask, temperature=0.9, chunk=4)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float() / 0.9
    assert logits.shape[-1] > 200_000
    full = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.reply_mask[:, 1:].bool()
    assert torch.allclose(lp[:, 1:][mask], full[mask], atol=1e-3)
