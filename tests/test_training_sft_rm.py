"""Chat data, chunked log-probs, SFT and the reward model on the tiny random Gemma 3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from training.adapters import ScalarHead, attach_adapter, load_head
from training.base_models import load_model_and_tokenizer
from training.chat_data import (
    collate,
    encode_prompt,
    encode_reply,
    example_for,
    preference_groups,
    stop_token_id,
    to_messages,
)
from training.config import LoraSettings, RewardConfig, SFTConfig, apply_overrides
from training.logprobs import reply_logprobs, token_logprobs
from training.losses import pairwise_reward_loss
from training.reward_model import (RewardModel, kwise_batch, kwise_loss, kwise_rewards, sequence_rewards,
                                   train_reward_model)
from training.sft import train_sft


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_path)
    return model, tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- #
# Chat data
# --------------------------------------------------------------------------- #


def test_example_is_the_served_chat_template_plus_stop(tiny) -> None:
    _, tok = tiny
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"}]
    ex = example_for(tok, prompt, " I am fine, thank you. ", 512)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "I am fine, thank you."}], tokenize=False)
    # The template ends the turn with "<end_of_turn>\n"; the model stops at <end_of_turn>.
    assert tok.decode(ex.input_ids) == full.rstrip("\n")
    assert ex.input_ids[-1] == stop_token_id(tok)
    assert ex.input_ids[: ex.prompt_length] == encode_prompt(tok, prompt)
    batch = collate([ex], tok.pad_token_id)
    assert tok.decode(batch.input_ids[0][batch.reply_mask[0].bool()]) == "I am fine, thank you.<end_of_turn>"


def test_hh_transcripts_become_messages() -> None:
    msgs = to_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}]
    assert to_messages("plain") == [{"role": "user", "content": "plain"}]
    # A speaker twice in a row (3 of the 1,803 HH prompts) becomes one turn: templates need alternation.
    msgs = to_messages("\n\nHuman: hi\n\nAssistant: a joke:\n\nAssistant: the joke\n\nHuman: more\n\nAssistant:")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "a joke:\n\nthe joke"


def test_trl_pairs_merge_into_groups_with_each_reply_once() -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"},
            {"prompt": "q", "chosen": "x", "rejected": "y"},
            {"prompt": "r", "completions": ["1", "2", "3"], "pairs": [[0, 1], [0, 2], [1, 2]]}]
    groups = preference_groups(rows)
    assert [g.completions for g in groups] == [["a", "b", "c"], ["x", "y"], ["1", "2", "3"]]
    assert groups[0].pairs == [(0, 1), (0, 2)]


# --------------------------------------------------------------------------- #
# Log-probs
# --------------------------------------------------------------------------- #


def test_chunked_logprobs_match_full_logits_with_temperature(tiny) -> None:
    model, tok = tiny
    examples = [example_for(tok, "What is the capital of France?", "Paris", 64),
                example_for(tok, "Count to five", "1, 2, 3, 4, 5", 64)]
    b = collate(examples, tok.pad_token_id)
    lp, ent = token_logprobs(model, b.input_ids, b.attention_mask, b.reply_mask, temperature=0.7, chunk=3,
                             with_entropy=True)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1] / 0.7
    full = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    mask = b.reply_mask[:, 1:].bool()
    assert torch.allclose(lp[:, 1:][mask], full[mask], atol=1e-5)
    assert (lp[:, 1:][~mask] == 0).all() and (lp[:, 0] == 0).all()
    probs = torch.softmax(logits, -1)
    full_ent = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(ent[:, 1:][mask], full_ent[mask], atol=1e-4)


def test_reply_logprobs_are_those_of_the_served_distribution(tiny) -> None:
    """With the app's frequency penalty and min-p, PPO's log-probs are exactly those of the distribution
    transformers' generate sampled from (its processed scores), token by token."""
    from training.chat_data import encode_prompt, left_pad
    from training.sampling import ReplySampling

    model, tok = tiny
    sampling = ReplySampling(temperature=0.7, min_p=0.1, frequency_penalty=0.5)
    ids, mask = left_pad([encode_prompt(tok, "Tell me a story"), encode_prompt(tok, "Hi")], tok.pad_token_id)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                         output_scores=True, pad_token_id=tok.pad_token_id, eos_token_id=[-1],
                         **sampling.generate_options(ids.shape[1]))
    reply = out.sequences[:, ids.shape[1]:]
    served = torch.stack([torch.log_softmax(step.float(), -1) for step in out.scores], 1)  # [batch, reply, vocab]
    expected = served.gather(-1, reply.unsqueeze(-1)).squeeze(-1)
    full = torch.cat([mask, torch.ones_like(reply)], 1)
    lp, ent = reply_logprobs(model, out.sequences, full, torch.ones_like(reply), ids.shape[1], temperature=0.7,
                             chunk=5, with_entropy=True, frequency_penalty=0.5, min_p=0.1)
    assert torch.allclose(lp, expected, atol=1e-4), (lp, expected)
    assert torch.isfinite(ent).all() and (ent >= 0).all()
    # Without them, the log-probs are the plain tempered ones, which differ wherever the penalty bites.
    plain, _ = reply_logprobs(model, out.sequences, full, torch.ones_like(reply), ids.shape[1], temperature=0.7)
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_a_scored_token_under_the_min_p_cut_keeps_a_finite_log_prob() -> None:
    """Sampler and scorer compute the logits in different passes; a sampled token that lands just under the
    min-p cut when scored must not get log 0 (a KL of 1e38 nats, then NaN weights)."""
    from torch import nn

    from training.logprobs import rows_logprobs

    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    rows = torch.tensor([[5.0, 0.0]])  # logits 5, 0, 0: probabilities ~0.99, ~0.007, ~0.007
    lp, _ = rows_logprobs(rows, torch.tensor([1]), head, min_p=0.1)  # token 1 is far under 0.1 x 0.99
    assert torch.isfinite(lp).all() and -6.0 < lp.item() < -4.0  # kept with its own weight: log(1 / (1 + e^5))
    kept, _ = rows_logprobs(rows, torch.tensor([0]), head, min_p=0.1)
    assert kept.item() == pytest.approx(0.0, abs=1e-6)  # the min-p set is token 0 alone (token 2 is cut)


@pytest.mark.parametrize(("dtype", "softcap"), [(torch.float32, None), (torch.bfloat16, 5.0)])
def test_the_written_out_log_prob_gradient_equals_the_taped_one(dtype: torch.dtype, softcap: float | None) -> None:
    """SampledLogprobs keeps only log π for backward and writes the gradient out; with temperature, the
    frequency penalty, min-p and the entropy all weighted (a bfloat16 head with a soft-cap too), it must equal
    autograd through the plain steps, and the log-probs alone (the entropy only logged) too."""
    from torch import nn

    from training.logprobs import SampledLogprobs, rows_logprobs, taped_rows_logprobs

    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=False).to(dtype).requires_grad_(False)
    rows = (torch.randn(6, 8) * 2).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (6,))
    history = torch.randint(-1, 50, (6, 4))
    w_lp, w_ent = torch.randn(6), torch.randn(6)

    def taped(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # one chunk: every step taped
        return taped_rows_logprobs(x, targets, head, softcap, 0.7, chunk=6, history=history, frequency_penalty=0.5,
                                   min_p=0.05)

    def ours(entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # two chunks, each checkpointed
        return rows_logprobs(rows, targets, head, softcap, 0.7, chunk=4, with_entropy=entropy, history=history,
                             frequency_penalty=0.5, min_p=0.05)

    tol = 1e-5 if dtype == torch.float32 else 1e-3
    want_lp, want_ent = taped(rows)
    (want,) = torch.autograd.grad((w_lp * want_lp).sum() + (w_ent * want_ent).sum(), rows)
    lp, ent = ours()
    (grad,) = torch.autograd.grad((w_lp * lp).sum() + (w_ent * ent).sum(), rows)
    assert torch.allclose(lp, want_lp, atol=tol) and torch.allclose(ent, want_ent, atol=tol)
    assert torch.allclose(grad.float(), want.float(), atol=tol), (grad.float() - want.float()).abs().max()
    (want_lp_only,) = torch.autograd.grad((w_lp * taped(rows)[0]).sum(), rows)
    (grad_lp_only,) = torch.autograd.grad((w_lp * ours()[0]).sum(), rows)  # the entropy output gets no gradient
    assert torch.allclose(grad_lp_only.float(), want_lp_only.float(), atol=tol)
    (want_ent_only,) = torch.autograd.grad((w_ent * taped(rows)[1]).sum(), rows)
    (grad_ent_only,) = torch.autograd.grad((w_ent * ours()[1]).sum(), rows)
    assert torch.allclose(grad_ent_only.float(), want_ent_only.float(), atol=tol)
    (no_entropy,) = torch.autograd.grad((w_lp * ours(entropy=False)[0]).sum(), rows)
    assert torch.allclose(no_entropy, grad_lp_only)
    # A uniform distribution over 4 tokens: entropy log 4, and each log-prob log(1/4).
    lp4, ent4 = SampledLogprobs.apply(torch.zeros(1, 4), torch.tensor([2]), 1.0, 0.0, True)
    assert lp4.item() == pytest.approx(-math.log(4)) and ent4.item() == pytest.approx(math.log(4))


def test_reply_history_lists_the_reply_tokens_before_each_scored_one() -> None:
    from training.logprobs import reply_history

    reply = torch.tensor([[5, 7, 7], [9, 2, 0]])
    scored = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second reply ended: its last position is not scored
    assert reply_history(reply, scored).tolist() == [[-1, -1, -1], [5, -1, -1], [5, 7, -1], [-1, -1, -1], [9, -1, -1]]


# --------------------------------------------------------------------------- #
# SFT
# --------------------------------------------------------------------------- #


def test_sft_learns_demonstrations_and_writes_a_loadable_adapter(tiny_model_path: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
        {"messages": [{"role": "user", "content": "Count to five"}, {"role": "assistant", "content": "1, 2, 3, 4, 5"}]},
    ])
    cfg = SFTConfig(base_model=str(tiny_model_path), data=str(data), output_dir=str(tmp_path / "sft"), epochs=8,
                    batch_size=2, lr=5e-3, progress=False)
    result = train_sft(cfg)
    assert result.final_loss < result.first_loss - 0.3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == cfg.lora.r
    with pytest.raises(Exception, match="not empty"):
        train_sft(cfg)  # never overwrite an adapter folder


# --------------------------------------------------------------------------- #
# Reward model
# --------------------------------------------------------------------------- #


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tiny) -> None:
    model, tok = tiny
    head = ScalarHead(model.config.hidden_size)
    ids = torch.tensor([encode_prompt(tok, "Hello!") + encode_reply(tok, "Hi")])
    alone = sequence_rewards(model, head, ids, torch.ones_like(ids))
    eos = tok.eos_token_id  # pad with EOS: the mask, not the id, says where the sequence ends
    right = torch.cat([ids, torch.full((1, 3), eos)], 1)
    right_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.full((1, 3), eos), ids], 1)
    left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    assert torch.allclose(sequence_rewards(model, head, right, right_mask), alone, atol=1e-5)
    assert torch.allclose(sequence_rewards(model, head, left, left_mask), alone, atol=1e-4)


def test_kwise_batch_equals_the_mean_over_pairs_with_k_forwards(tiny) -> None:
    model, tok = tiny
    torch.manual_seed(0)
    head = ScalarHead(model.config.hidden_size)
    groups = preference_groups([{"prompt": "Say hello", "completions": ["Hello!", "Hi there", "Goodbye", "No"],
                                 "pairs": [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]},
                                {"prompt": "Count", "chosen": "1, 2, 3", "rejected": "five"}])
    kb = kwise_batch(groups, tok, 128)
    shapes = []
    hook = model.get_decoder().register_forward_hook(lambda m, i, o: shapes.append(o.last_hidden_state.shape[:2]))
    try:
        loss, _ = kwise_loss(model, head, kb, torch.device("cpu"))
    finally:
        hook.remove()
    real = sum(len(p) + sum(len(r) for r in group) for p, group in zip(kb.prompts, kb.replies))
    assert shapes == [(1, real)]  # each prompt once and each of its K replies once, packed; never 2 · C(K,2) rows
    # Reference: every pair scored on its own, averaged within each prompt, then over prompts.
    per_prompt = []
    for g in groups:
        pair_losses = []
        for w, l in g.pairs:
            ex = [example_for(tok, g.prompt, g.completions[i], 128) for i in (w, l)]
            b = collate(ex, tok.pad_token_id)
            r = sequence_rewards(model, head, b.input_ids, b.attention_mask)
            pair_losses.append(pairwise_reward_loss(r, torch.tensor([0]), torch.tensor([1])))
        per_prompt.append(torch.stack(pair_losses).mean())
    assert torch.allclose(loss, torch.stack(per_prompt).mean(), atol=1e-5)


def test_kwise_rewards_equal_whole_rows(tiny) -> None:
    model, tok = tiny
    torch.manual_seed(0)
    head = ScalarHead(model.config.hidden_size)
    groups = preference_groups([{"prompt": "Hello! How are you today?", "chosen": "I am fine, thank you.", "rejected": "no"},
                                {"prompt": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"}],
                                 "completions": ["Paris", "The quick brown fox", "x"], "pairs": [[0, 1], [1, 2]]}])
    kb = kwise_batch(groups, tok, 128)
    full = kb.full_batch()
    expected = sequence_rewards(model, head, full.input_ids, full.attention_mask)
    assert torch.allclose(kwise_rewards(model, head, kb, torch.device("cpu")), expected, atol=1e-5)


@pytest.mark.parametrize(("row_tokens", "attention", "dtype"), [
    (1, "sdpa", "float32"), (40, "sdpa", "float32"), (10_000, "sdpa", "float32"), (40, "eager", "float32"),
    (40, "sdpa", "bfloat16")])
def test_packed_rewards_and_their_gradients_equal_whole_rows(tiny_model_path: Path, row_tokens: int,
                                                             attention: str, dtype: str) -> None:
    """Each prompt and its K replies packed as a tree into rows (block mask, positions after the prompt; a row
    per group, each longer than a row; some per row; all in one): the rewards and the gradients are those of
    every prompt + reply run on its own row, padded, with either attention kernel's mask."""
    from training.reward_model import packed_rewards

    model, tok = load_model_and_tokenizer(tiny_model_path, dtype=dtype, attention=attention)
    assert model.config._attn_implementation == attention
    tol = 1e-4 if dtype == "float32" else 5e-2
    torch.manual_seed(0)
    head = ScalarHead(model.config.hidden_size)  # float32, as in training
    groups = preference_groups([
        {"prompt": "Hello! How are you today?", "chosen": "I am fine, thank you.", "rejected": "no"},
        {"prompt": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"}],
         "completions": ["Paris", "The quick brown fox jumps over the lazy dog", "x"], "pairs": [[0, 1], [1, 2]]},
        {"prompt": "Count to ten, slowly, and say each number", "chosen": "1 2 3", "rejected": "ten"}])
    kb = kwise_batch(groups, tok, 128)
    full = kb.full_batch()
    weights = torch.randn(7)
    params = list(head.parameters()) + [model.get_input_embeddings().weight]  # the gradient reaches every token
    shapes = []
    hook = model.get_decoder().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.last_hidden_state.shape[:2])))
    params[-1].requires_grad_(True)
    try:
        expected = sequence_rewards(model, head, full.input_ids, full.attention_mask)
        want = torch.autograd.grad((weights * expected).sum(), params)
        shapes.clear()
        packed = packed_rewards(model, head, kb.prompts, kb.replies, kb.pad_id, torch.device("cpu"), row_tokens)
        got = torch.autograd.grad((weights * packed).sum(), params)
    finally:
        hook.remove()
        params[-1].requires_grad_(False)
    assert torch.allclose(packed.float(), expected.float(), atol=tol / 10 if dtype == "float32" else tol)
    if dtype == "float32":
        assert all(torch.allclose(a, b, atol=tol) for a, b in zip(got, want)), [
            (a - b).abs().max() for a, b in zip(got, want)]
    else:  # bfloat16 sums in another order: compare the whole gradient's relative error
        assert all((a.float() - b.float()).norm() <= 0.05 * b.float().norm() for a, b in zip(got, want))
    real = sum(len(p) + sum(len(r) for r in group) for p, group in zip(kb.prompts, kb.replies))
    rows, width = shapes[0]
    assert rows == {1: 3, 10_000: 1}.get(row_tokens, rows) and (row_tokens != 10_000 or width == real)


def test_lora_and_head_both_train(tiny_model_path: Path) -> None:
    model, tok = load_model_and_tokenizer(tiny_model_path)
    model = attach_adapter(model, "default", None, LoraSettings(r=8), trainable=True)
    head = ScalarHead(model.get_base_model().config.hidden_size)
    head_before = head.linear.weight.detach().clone()
    kb = kwise_batch(preference_groups([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away"}]), tok, 64)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):  # LoRA B starts at 0, so A gets its first gradient on the second step
        loss, _ = kwise_loss(model, head, kb, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(head.linear.weight, head_before)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_micro_batches_accumulate_the_same_gradient_as_the_whole_step(tiny_model_path: Path) -> None:
    from training.reward_model import accumulate_kwise_gradients

    model, tok = load_model_and_tokenizer(tiny_model_path)
    model = attach_adapter(model, "default", None, LoraSettings(r=4), trainable=True)
    torch.manual_seed(0)
    for p in model.parameters():  # LoRA B starts at 0: give every LoRA weight a gradient to compare
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    head = ScalarHead(model.get_base_model().config.hidden_size)
    groups = preference_groups(preference_rows(3) + [{"prompt": "Count", "chosen": "1, 2, 3", "rejected": "five"}])
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    results = []
    for micro in (0, 1, 3):
        for p in params:
            p.grad = None
        cfg = RewardConfig(max_length=64, micro_batch_groups=micro)
        loss, acc, pairs = accumulate_kwise_gradients(model, head, groups, tok, cfg, torch.device("cpu"))
        results.append((loss, acc, pairs, [p.grad.clone() for p in params]))
    (loss0, acc0, pairs0, grads0) = results[0]
    assert pairs0 == 3 * 3 + 1
    for loss, acc, pairs, grads in results[1:]:
        assert loss == pytest.approx(loss0, abs=1e-5) and acc == pytest.approx(acc0) and pairs == pairs0
        assert all(torch.allclose(g, g0, atol=1e-5) for g, g0 in zip(grads, grads0))


def test_checkpointed_layers_recompute_in_backward_and_give_the_same_gradient(tiny_model_path: Path) -> None:
    """gradient_checkpointing: each layer runs again in backward (in eval mode too, as PPO trains), never without
    gradients, and the LoRA gradient is the one without checkpointing."""
    from training.adapters import checkpoint_layers

    def run(checkpointed: bool) -> tuple[list[torch.Tensor], int, int]:
        model, tok = load_model_and_tokenizer(tiny_model_path)  # eval mode, as PPO's stack
        model = attach_adapter(model, "default", None, LoraSettings(r=4), trainable=True)
        torch.manual_seed(0)
        for p in model.parameters():  # LoRA B starts at 0: give every LoRA weight a gradient to compare
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        if checkpointed:
            assert checkpoint_layers(model) == model.get_base_model().config.num_hidden_layers
            checkpoint_layers(model)  # a second call leaves the wrapped layers as they are
        calls = [0]
        for name, module in model.named_modules():
            if name.endswith("self_attn"):
                module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        ex = collate([example_for(tok, "Count to three", "1, 2, 3", 64)], 0)
        with torch.no_grad():
            token_logprobs(model, ex.input_ids, ex.attention_mask, ex.reply_mask)
        no_grad_calls = calls[0]
        lp, _ = token_logprobs(model, ex.input_ids, ex.attention_mask, ex.reply_mask)
        lp.sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad], no_grad_calls, calls[0] - no_grad_calls

    grads, plain_no_grad, plain_calls = run(False)
    ckpt_grads, ckpt_no_grad, ckpt_calls = run(True)
    layers = plain_no_grad
    assert layers > 0 and ckpt_no_grad == layers and plain_calls == layers
    assert ckpt_calls == 2 * layers  # each layer's forward again in backward, once (not once per call above)
    assert len(grads) == len(ckpt_grads) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ckpt_grads))
    assert any(g.abs().sum() > 0 for g in ckpt_grads)


def preference_rows(n: int) -> list[dict]:
    """A learnable preference: the polite reply beats the rude one."""
    return [{"prompt": f"Question {i}: can you help me?",
             "completions": ["Thanks for your help! You're welcome.", "No.", "Goodbye!"],
             "pairs": [[0, 1], [0, 2], [2, 1]]} for i in range(n)]


def test_reward_model_trains_evaluates_shifts_and_warm_starts(tiny_model_path: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(10))
    cfg = RewardConfig(base_model=str(tiny_model_path), data=str(data), output_dir=str(tmp_path / "rm1"), epochs=4,
                       groups_per_batch=4, lr=5e-3, progress=False)
    first = train_reward_model(cfg)
    assert first.eval_pairs == 6 and first.eval_accuracy == 1.0  # 2 of 10 prompts held out
    head, info = load_head(first.adapter_dir)
    assert info["shift"] == pytest.approx(first.shift) and info["std"] > 0
    rm = RewardModel.load(first.adapter_dir, base_model=str(tiny_model_path), device="cpu")
    polite, rude = rm.score(["Question 99: can you help me?"] * 2, ["Thanks for your help! You're welcome.", "No."])
    assert polite > rude
    # The shift makes the reference replies (here: the replies that win a pair) average 0.
    refs = rm.score(["Question 0: can you help me?"] * 2, ["Thanks for your help! You're welcome.", "Goodbye!"])
    assert abs(sum(refs) / 2) < 0.1 * info["std"]

    warm = apply_overrides(RewardConfig(base_model=str(tiny_model_path), data=str(data), progress=False),
                           [f"output_dir={tmp_path / 'rm2'}", f"init_adapter={first.adapter_dir}", "epochs=0.1", "lr=1e-9"])
    second = train_reward_model(warm)
    assert second.eval_accuracy == 1.0  # starts where the first left off
