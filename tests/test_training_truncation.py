"""The one truncation rule (chat_data.fit_group / fit_prompt) for SFT, the reward model and PPO."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.adapters import ScalarHead
from training.base_models import load_model_and_tokenizer
from training.chat_data import (
    DataError,
    collate,
    encode_prompt,
    encode_prompt_fitted,
    encode_reply,
    example_for,
    fit_group,
    fit_prompt,
    fit_reply,
    keep_newest,
    preference_groups,
    rated_replies,
    stop_token_id,
)
from training.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, TokenBudget
from training.reward_model import kwise_batch, kwise_rewards, sequence_rewards, truncation_report

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
GENERATION_PROMPT = "<start_of_turn>model\n"


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path):
    return load_model_and_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


def conversation(turns: int, words: int) -> list[dict[str, str]]:
    """A system turn and ``turns`` user/assistant exchanges, then a last user question."""
    messages = [SYSTEM]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: " + " ".join(["water"] * words)})
        messages.append({"role": "assistant", "content": f"Answer {i}: " + " ".join(["sea"] * words)})
    messages.append({"role": "user", "content": "And the last one, please?"})
    return messages


def reply_of(tok, n_tokens: int) -> str:
    """A reply whose ids (body + stop token) are exactly ``n_tokens`` long."""
    words = ["the"]
    while len(encode_reply(tok, " ".join(words))) < n_tokens:
        words.append("the")
    text = " ".join(words)
    assert len(encode_reply(tok, text)) == n_tokens
    return text


# --------------------------------------------------------------------------- #
# Hand-built id lists
# --------------------------------------------------------------------------- #


def test_fit_reply_keeps_whole_replies_and_cuts_long_ones_without_their_stop() -> None:
    assert fit_reply([5, 6, 7, 99], 4) == ([5, 6, 7, 99], False)
    assert fit_reply([5, 6, 7, 8, 9, 99], 4) == ([5, 6, 7, 8], True)  # the first tokens, no stop token
    assert fit_reply([5, 6, 7, 99], 3) == ([5, 6, 7], True)  # the stop token alone did not fit: still cut


def test_keep_newest_keeps_head_tail_and_the_newest_middle() -> None:
    ids = [1, 2, 2, 10, 11, 12, 13, 14, 8, 9]  # BOS + system (3), body (5), end + generation prompt (2)
    assert keep_newest(ids, 10, head=3, tail=2) == ids
    assert keep_newest(ids, 7, head=3, tail=2) == [1, 2, 2, 13, 14, 8, 9]
    assert keep_newest(ids, 4, head=3, tail=2) == [1, 14, 8, 9]  # head + tail too long: BOS + the newest


def test_budgets_default_from_max_length_and_ppo_uses_max_new_tokens() -> None:
    budget = SFTConfig(max_length=512).token_budget()
    assert budget.reply == 256 and budget.prompt(145) == 367 and budget.prompt(256) == 256
    assert TokenBudget(512, max_prompt_tokens=100).prompt(10) == 100
    ppo = PPOConfig(max_length=512, max_new_tokens=64).token_budget()
    assert ppo.reply == 64 and ppo.generation_prompt == 448
    with pytest.raises(ConfigError, match="max_new_tokens"):
        PPOConfig(max_length=64, max_new_tokens=60).token_budget()


# --------------------------------------------------------------------------- #
# The tiny tokenizer and its chat template
# --------------------------------------------------------------------------- #


def test_long_prompt_keeps_the_whole_reply(tok) -> None:
    """The issue's case: a 1,500-token prompt and a 145-token reply at max_length 512 (the reply
    used to keep 16 tokens)."""
    prompt = conversation(turns=4, words=72)
    assert 1400 < len(encode_prompt(tok, prompt)) < 1700
    reply = reply_of(tok, 145)
    ex = example_for(tok, prompt, reply, RewardConfig(max_length=512).token_budget())
    assert ex.reply_length == 145 and not ex.reply_cut
    assert ex.input_ids[ex.prompt_length :] == encode_reply(tok, reply)
    assert ex.prompt_cut and ex.prompt_length <= 512 - 145 and len(ex.input_ids) <= 512


def test_system_turn_and_bos_survive_and_oldest_turns_go_first(tok) -> None:
    prompt = conversation(turns=6, words=20)
    full = encode_prompt(tok, prompt)
    fitted = fit_prompt(tok, prompt, len(full) // 2)
    text = tok.decode(fitted.ids)
    assert fitted.ids[0] == tok.bos_token_id and text.startswith("<bos><start_of_turn>user\n" + SYSTEM["content"])
    assert text.endswith("And the last one, please?<end_of_turn>\n" + GENERATION_PROMPT)
    assert fitted.turns_dropped % 2 == 0 and fitted.tokens_cut == 0  # whole exchanges, never half a turn
    kept = [i for i in range(6) if f"Question {i}:" in text]
    assert kept and kept == list(range(6 - len(kept), 6))  # the newest exchanges, the oldest went first
    assert all(f"Answer {i}:" in text for i in kept)
    # Exactly the template's rendering of the shortened conversation: no token was cut inside a turn.
    shorter = [SYSTEM] + prompt[1 + fitted.turns_dropped :]
    assert fitted.ids == encode_prompt(tok, shorter)


def test_a_newest_turn_too_long_alone_loses_its_oldest_tokens(tok) -> None:
    prompt = [SYSTEM, {"role": "user", "content": "Opening " + " ".join(["water"] * 300) + " finish"}]
    ids = encode_prompt_fitted(tok, prompt, 64)
    text = tok.decode(ids)
    assert len(ids) == 64 and ids[0] == tok.bos_token_id
    assert text.startswith("<bos><start_of_turn>user\n" + SYSTEM["content"] + "\n\n")
    assert text.endswith("water finish<end_of_turn>\n" + GENERATION_PROMPT) and "Opening" not in text
    assert encode_prompt_fitted(tok, prompt, 10_000) == encode_prompt(tok, prompt)  # room: nothing changes


def test_sft_cut_reply_has_no_stop_target(tok) -> None:
    budget = TokenBudget(64, max_reply_tokens=6)
    ex = example_for(tok, "Count to ten", "one two three four five six seven eight nine ten", budget)
    assert ex.reply_cut and ex.reply_length == 6
    batch = collate([ex], tok.pad_token_id)
    targets = batch.input_ids[0][batch.reply_mask[0].bool()].tolist()
    assert len(targets) == 6 and stop_token_id(tok) not in targets
    whole = example_for(tok, "Count to ten", "one two", budget)
    assert not whole.reply_cut and whole.input_ids[-1] == stop_token_id(tok)  # a reply that fits keeps its stop


def test_reward_of_a_cut_reply_is_read_at_its_last_kept_token(tiny) -> None:
    model, tok = tiny
    torch.manual_seed(0)
    head = ScalarHead(model.config.hidden_size)
    long_reply = "one two three four five six seven eight nine ten"
    groups = preference_groups([{"prompt": "Count to ten", "chosen": long_reply, "rejected": "no"}])
    budget = TokenBudget(64, max_reply_tokens=5)
    kb = kwise_batch(groups, tok, budget)
    prompt = encode_prompt(tok, "Count to ten")
    assert kb.prompts == [prompt]
    cut = encode_reply(tok, long_reply)[:5]
    assert kb.replies == [[cut, encode_reply(tok, "no")]]
    rewards = kwise_rewards(model, head, kb, torch.device("cpu"))
    at_last_kept = sequence_rewards(model, head, torch.tensor([prompt + cut]), torch.ones(1, len(prompt) + 5, dtype=torch.long))
    with_stop = torch.tensor([prompt + cut[:4] + [stop_token_id(tok)]])
    old_rule = sequence_rewards(model, head, with_stop, torch.ones_like(with_stop))
    assert torch.allclose(rewards[0], at_last_kept[0], atol=1e-5)
    assert not torch.allclose(rewards[0], old_rule[0], atol=1e-3)
    report = truncation_report(groups, tok, budget)
    assert (report.prompts, report.prompts_cut, report.replies, report.replies_cut) == (1, 0, 2, 1)


def test_ppo_sampler_and_scorer_see_identical_prompt_ids(tiny_model_path: Path, tok, tmp_path: Path, monkeypatch) -> None:
    import json

    import training.ppo
    from training.config import LoraSettings
    from training.rollout import hf_sampler_factory

    prompts = [conversation(turns=3, words=12), conversation(turns=1, words=4), "Hello! How are you?",
               [SYSTEM, {"role": "user", "content": "Opening " + " ".join(["water"] * 200)}]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = PPOConfig(base_model=str(tiny_model_path), prompts=str(path), output_dir=str(tmp_path / "ppo"), iterations=1,
                    rollout_batch=4, minibatch=4, ppo_epochs=1, max_new_tokens=8, max_length=96, ptx_coef=0.0,
                    progress=False, lora=LoraSettings(r=4, alpha=8))
    sampled, scored = [], []

    class RecordingSampler:
        def __init__(self, inner):
            self.inner, self.needs_adapter_folder = inner, inner.needs_adapter_folder

        def sample(self, prompt_ids, messages):
            sampled.extend(list(p) for p in prompt_ids)
            return self.inner.sample(prompt_ids, messages)

        def set_policy(self, name, folder):
            self.inner.set_policy(name, folder)

        def close(self):
            self.inner.close()

    make_batch = training.ppo.make_rollout_batch

    def recording_batch(prompt_ids, *args, **kwargs):
        batch = make_batch(prompt_ids, *args, **kwargs)
        pad = batch.context_length
        for row, mask, ids in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), prompt_ids):
            scored.append([t for t, m in zip(row[:pad], mask[:pad]) if m])  # what the log-prob scorers read
            assert batch.prompt_ids[len(scored) - 1] == ids  # what the reward model reads
        return batch

    monkeypatch.setattr(training.ppo, "make_rollout_batch", recording_batch)
    reward = lambda reply, mask: mask.sum(1).float()  # noqa: E731
    training.ppo.train_ppo(cfg, reward_fn=reward, sampler_factory=lambda c, ctx: RecordingSampler(hf_sampler_factory(c, ctx)))
    expected = {json.dumps(encode_prompt_fitted(tok, p, cfg.token_budget().generation_prompt)) for p in prompts}
    assert sampled == scored and {json.dumps(s) for s in sampled} == expected
    assert all(len(s) <= 96 - 8 for s in sampled)
    assert any(len(encode_prompt(tok, p)) > 96 for p in prompts)  # some prompts really had to be fitted


# -- replies the server cut off at its token limit ------------------------------------------------


def test_a_reply_cut_off_when_served_gets_no_stop_token_anywhere_it_is_read(tok) -> None:
    """The reward model must read a served reply that hit the token limit as PPO's scorer reads a rollout
    cut at its limit: without a stop token (else it learns that every cut reply ended)."""
    stop = stop_token_id(tok)
    assert encode_reply(tok, "Paris is the", ended=False)[-1] != stop and encode_reply(tok, "Paris.")[-1] == stop
    fitted = fit_group(tok, "Capital?", ["Paris.", "Paris is the"], TokenBudget(64), [True, False])
    assert fitted.replies[0][-1] == stop and fitted.replies[1][-1] != stop
    assert fitted.replies_cut == [False, False]  # not cut by this budget: it never ended
    (group,) = preference_groups([{"prompt": "Capital?", "completions": ["Paris.", "Paris is the"],
                                   "pairs": [[0, 1]], "ended": [True, False]}])
    assert group.ended == [True, False]
    batch = kwise_batch([group], tok, 64)
    assert batch.replies[0][0][-1] == stop and batch.replies[0][1][-1] != stop
    with pytest.raises(DataError, match="one true/false per completion"):
        preference_groups([{"prompt": "Capital?", "completions": ["a", "b"], "pairs": [[0, 1]], "ended": [True]}])
    # TRL pairs say it per side; a pair without the keys is two ended replies (TRL's own datasets).
    trl = [{"prompt": "Capital?", "chosen": "Paris.", "rejected": "Paris is the", "rejected_ended": False},
           {"prompt": "Capital?", "chosen": "Lyon? No: Paris.", "rejected": "Paris is the", "chosen_ended": True}]
    (group,) = preference_groups(trl)
    assert group.completions == ["Paris.", "Paris is the", "Lyon? No: Paris."] and group.ended == [True, False, True]
    assert kwise_batch([group], tok, 64).replies[0][1][-1] != stop
    with pytest.raises(DataError, match="chosen_ended"):
        preference_groups([{"prompt": "Capital?", "chosen": "a", "rejected": "b", "chosen_ended": "no"}])
    (rated,) = rated_replies([{"prompt": "Capital?", "completion": "Paris is the", "label": False, "ended": False}])
    assert rated.ended is False
    assert example_for(tok, "Capital?", "Paris is the", 64, ended=False).input_ids[-1] != stop
