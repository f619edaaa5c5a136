"""PPO-ptx end to end on a tiny model, and the adapters it writes served by the chat app's engines."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from training.base_models import MANIFEST_NAME, load_model_and_tokenizer
from training.config import ConfigError, LoraSettings, PPOConfig, RewardConfig, SFTConfig
from training.losses import mask_after_first_stop
from training.metrics_log import read_metrics
from training.ppo import make_rollout_batch, train_ppo
from training.reward_model import train_reward_model
from training.sampling import ReplySampling
from training.sft import train_sft

PROMPTS = ["What is the capital of France?", "Count to five", "Write a poem about the sea", "Hello! How are you?",
           "Explain how a neural network learns", "Translate good morning", "Say thanks", "Summarise this text"]
DEMOS = [("What is the capital of France?", "The capital of France is Paris."), ("Count to five", "1, 2, 3, 4, 5"),
         ("Hello! How are you?", "I am fine, thank you."), ("Say thanks", "Thanks for your help!")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo-data")
    return {
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
        "sft": write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in DEMOS]),
        "prefs": write_jsonl(root / "prefs.jsonl", [
            {"prompt": p, "chosen": "Thanks for your help! You're welcome.", "rejected": "No."} for p in PROMPTS]),
    }


@pytest.fixture(scope="module")
def steerable_model(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its (tied) embeddings scaled ×5.

    At random init its logits are h·e with |h| = √64 after the final RMSNorm and
    |e| ≈ 0.16, so no LoRA can move any logit by more than ~1.3 nats: every policy
    is nearly uniform. Scaled, the policy can actually follow a reward.
    """
    folder = tmp_path_factory.mktemp("models") / "tiny-steerable"
    model, tok = load_model_and_tokenizer(tiny_model_path)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.copy(tiny_model_path / MANIFEST_NAME, folder / MANIFEST_NAME)
    return folder


def token_set_reward(model_path: Path):
    """A synthetic reward model: the share of reply tokens in a chosen set (half the vocabulary,
    picked along a random direction of the embedding space, so the policy can steer toward it)."""
    model, _ = load_model_and_tokenizer(model_path)
    embeddings = model.get_input_embeddings().weight.detach()
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    chosen = embeddings @ direction > 0

    def reward(reply: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (chosen[reply.cpu()].float() * mask.cpu()).sum(1) / mask.sum(1).cpu()

    return reward


def test_ppo_stops_before_an_update_on_non_finite_numbers() -> None:
    from training.ppo import check_finite

    check_finite(3, score=torch.tensor([1.0, -2.0]), kl=torch.zeros(2, 4))
    with pytest.raises(FloatingPointError, match="iteration 3: non-finite kl, advantages"):
        check_finite(3, score=torch.ones(2), kl=torch.tensor([float("-inf")]), advantages=torch.tensor([float("nan")]))


def test_rollout_batch_masks_everything_after_the_first_stop() -> None:
    batch = make_rollout_batch([[2, 7], [2]], [[9, 1, 8, 8], [9, 9]], stop_ids=[1, 5], pad_id=0,
                               device=torch.device("cpu"))
    assert batch.context_length == 2
    assert batch.reply_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert batch.ended.tolist() == [True, False]
    assert batch.reply.tolist() == [[9, 1, 0, 0], [9, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]
    assert mask_after_first_stop(torch.tensor([[5, 5]]), [5])[0].tolist() == [[1, 0]]


def ppo_config(model: Path, data: dict[str, Path], out: Path, ptx_coef: float) -> PPOConfig:
    return PPOConfig(base_model=str(model), prompts=str(data["prompts"]), sft_data=str(data["sft"]),
                     output_dir=str(out), iterations=16, rollout_batch=32, minibatch=16, ppo_epochs=2, lr=2e-3,
                     max_new_tokens=6, init_kl_coef=0.1, target_kl=2.0, ptx_coef=ptx_coef,
                     progress=False, lora=LoraSettings(r=8, alpha=16))


def test_ppo_raises_the_reward_with_bounded_kl_and_ptx_keeps_pretraining_loss(
        steerable_model: Path, data: dict[str, Path], tmp_path: Path) -> None:
    reward = token_set_reward(steerable_model)
    plain = train_ppo(ppo_config(steerable_model, data, tmp_path / "ppo", ptx_coef=0.0), reward_fn=reward)
    log = [r for r in read_metrics(plain.metrics_path) if "reward/mean" in r]
    first = sum(r["reward/mean"] for r in log[:2]) / 2
    last = sum(r["reward/mean"] for r in log[-4:]) / 4
    assert last > first + 0.05, [round(r["reward/mean"], 3) for r in log]
    assert max(r["kl/per_reply"] for r in log) < 2 * 2.0  # under twice the target KL, whatever β does
    assert log[0]["kl/per_reply"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    for key in ("reward/std", "kl/beta", "loss/policy", "loss/value", "policy/entropy", "policy/clipfrac",
                "policy/approx_kl", "value/explained_variance", "loss/ptx", "reply/length", "time/tokens_per_s"):
        assert key in log[0]
    assert (plain.adapter_dir / "tensorboard").is_dir()
    assert plain.memory["ratio"] < 0.5
    assert log[0]["policy/grad_norm"] > 0 and log[0]["value/grad_norm"] > 0
    assert log[0]["policy/ptx_grad_norm"] == 0 and log[0]["policy/pg_grad_norm"] > 0  # no ptx term
    # The default horizon is a quarter of the run: β follows the KL within it (KL below target: β falls).
    assert log[-1]["kl/beta"] < 0.9 * log[0]["kl/beta"], [round(r["kl/beta"], 4) for r in log]

    with_ptx = train_ppo(ppo_config(steerable_model, data, tmp_path / "ppo-ptx", ptx_coef=1.0), reward_fn=reward)
    # The gate's documents are held out of the ptx term: both sets are reported, and ptx helps on both.
    assert with_ptx.ptx_train_nll_after <= with_ptx.ptx_train_nll_before
    assert with_ptx.ptx_nll_after <= with_ptx.ptx_nll_before
    assert with_ptx.ptx_nll_after < plain.ptx_nll_after - 0.5
    ptx_log = [r for r in read_metrics(with_ptx.metrics_path) if "reward/mean" in r]
    assert all(r["policy/ptx_grad_norm"] > 0 for r in ptx_log)
    final = read_metrics(with_ptx.metrics_path)[-1]
    assert final["ptx/held_out_docs"] == len(DEMOS) // 2 and final["ptx/train_docs"] == len(DEMOS) - len(DEMOS) // 2


def test_rloo_ppo_raises_the_reward_without_a_critic(steerable_model: Path, data: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """advantage=rloo: 4 replies to each of 8 prompts per batch, each against the others' mean; the value
    head is never run or trained, and the reward rises as with GAE."""
    import dataclasses

    import training.ppo as ppo

    reward = token_set_reward(steerable_model)
    cfg = dataclasses.replace(ppo_config(steerable_model, data, tmp_path / "rloo", ptx_coef=0.0),
                              advantage="rloo", replies_per_prompt=4)
    values_calls = []
    original = ppo.PolicyStack.values
    ppo.PolicyStack.values = lambda self, *a: values_calls.append(1) or original(self, *a)
    try:
        result = train_ppo(cfg, reward_fn=reward)
    finally:
        ppo.PolicyStack.values = original
    assert not values_calls
    log = [r for r in read_metrics(result.metrics_path) if "reward/mean" in r]
    first = sum(r["reward/mean"] for r in log[:2]) / 2
    last = sum(r["reward/mean"] for r in log[-4:]) / 4
    assert last > first + 0.05, [round(r["reward/mean"], 3) for r in log]
    assert "value/explained_variance" not in log[0] and log[0]["value/grad_norm"] == 0
    assert not (result.adapter_dir / "value").exists()  # no critic built, trained or saved
    assert max(r["kl/per_reply"] for r in log) < 2 * 2.0
    with pytest.raises(ConfigError, match="replies_per_prompt"):
        train_ppo(dataclasses.replace(cfg, replies_per_prompt=1, output_dir=str(tmp_path / "x")), reward_fn=reward)
    with pytest.raises(ConfigError, match="multiple of replies_per_prompt"):
        train_ppo(dataclasses.replace(cfg, replies_per_prompt=5, output_dir=str(tmp_path / "y")), reward_fn=reward)


def test_split_grad_norms_separates_the_ptx_gradient_from_the_policy_terms() -> None:
    from training.ppo import split_grad_norms

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    (3 * a[0] + 4 * a[1]).backward()  # the ptx term alone: gradient (3, 4) on a, none on b
    ptx_grads = [None if q.grad is None else q.grad.clone() for q in (a, b)]
    (a[0] + 12 * b[0]).backward()  # then the policy terms: (1, 0) on a, 12 on b
    ptx_norm, pg_norm = split_grad_norms([a, b], ptx_grads)
    assert ptx_norm == pytest.approx(5.0) and pg_norm == pytest.approx((1 + 144) ** 0.5)


def test_ptx_documents_held_out_for_the_gate_are_never_trained_on() -> None:
    from training.ppo import split_ptx_documents

    docs = [f"document {i}" for i in range(10)] + ["document 3"]  # a duplicate must not land on both sides
    train, held = split_ptx_documents(docs, eval_docs=4, seed=0)
    assert len(held) == 4 and len(train) == 6 and not set(train) & set(held)
    assert set(train) | set(held) == set(docs)
    assert split_ptx_documents(docs, eval_docs=16, seed=0)[1].__len__() == 5  # at most half is held out
    assert split_ptx_documents(docs, 4, seed=0) == (train, held)  # the seed fixes the split


def test_actor_and_critic_gradients_are_clipped_separately() -> None:
    from training.ppo import clip_actor_critic

    policy, value = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    policy.grad, value.grad = torch.tensor([0.3, 0.4]), torch.tensor([300.0, 400.0])
    norms = clip_actor_critic([policy], [value], max_norm=1.0)
    assert [round(float(n), 3) for n in norms] == [0.5, 500.0]
    assert torch.allclose(policy.grad, torch.tensor([0.3, 0.4]))  # a huge value gradient leaves the policy's alone
    assert torch.allclose(value.grad, torch.tensor([0.6, 0.8]))


@pytest.fixture(scope="module")
def full_loop(tiny_model_path: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SFT, then a reward model, then PPO from both: the whole loop on the tiny model."""
    root = tmp_path_factory.mktemp("loop")
    base, lora = str(tiny_model_path), LoraSettings(r=8, alpha=16)
    sft = train_sft(SFTConfig(base_model=base, data=str(data["sft"]), output_dir=str(root / "sft"), epochs=1,
                              batch_size=4, progress=False, lora=lora))
    rm = train_reward_model(RewardConfig(base_model=base, data=str(data["prefs"]), output_dir=str(root / "rm"),
                                         epochs=1, groups_per_batch=4, progress=False, lora=lora))
    cfg = PPOConfig(base_model=base, prompts=str(data["prompts"]), sft_adapter=str(sft.adapter_dir),
                    reward_adapter=str(rm.adapter_dir), sft_data=str(data["sft"]), output_dir=str(root / "ppo"),
                    iterations=2, rollout_batch=4, minibatch=2, ppo_epochs=1, max_new_tokens=5, save_every=1,
                    missing_eos_penalty=1.0, progress=False, lora=lora,
                    temperature=0.8, frequency_penalty=0.5, min_p=0.1)  # sampled and scored as the app serves
    return {"sft": sft, "rm": rm, "ppo": train_ppo(cfg)}


def test_ppo_with_sft_reference_and_reward_adapter(full_loop: dict) -> None:
    result = full_loop["ppo"]
    log = [r for r in read_metrics(result.metrics_path) if "reward/mean" in r]
    # policy = copy of the SFT reference, both scored under the served sampling (temperature, penalty, min-p)
    assert log[0]["kl/per_reply"] == pytest.approx(0.0, abs=1e-4)
    assert (result.adapter_dir / "checkpoints" / "iter-00002" / "adapter_model.safetensors").is_file()
    assert (result.adapter_dir / "value" / "scalar_head.safetensors").is_file()
    assert len(result.samples) == 4


def test_policy_can_start_from_another_adapter_than_its_sft_reference(full_loop: dict, tiny_model_path: Path) -> None:
    """A later round starts from the live PPO policy (init_adapter) while the KL stays to pi_SFT."""
    from safetensors.torch import load_file

    from training.adapters import adapter_parameters
    from training.ppo import build_stack

    start = full_loop["ppo"].adapter_dir
    cfg = PPOConfig(base_model=str(tiny_model_path), sft_adapter=str(full_loop["sft"].adapter_dir),
                    init_adapter=str(start), reward_adapter=str(full_loop["rm"].adapter_dir),
                    lora=LoraSettings(r=8, alpha=16))
    stack = build_stack(cfg, with_reward_adapter=True)
    saved = load_file(str(start / "adapter_model.safetensors"))
    policy = dict((n, p) for n, p in stack.model.named_parameters() if ".policy." in n and "lora_B" in n)
    reference = dict((n, p) for n, p in stack.model.named_parameters() if ".reference." in n and "lora_B" in n)
    assert policy and len(policy) == len(reference) and len(adapter_parameters(stack.model, "policy")) == 2 * len(policy)
    name = sorted(policy)[0]
    key = next(k for k in saved if k.endswith(name.split("base_model.model.", 1)[-1].replace(".policy", "")))
    assert torch.equal(policy[name].detach(), saved[key])  # the policy is the start adapter ...
    assert stack.has_reference
    differs = [not torch.equal(policy[n].detach(), reference[n.replace(".policy.", ".reference.")].detach()) for n in policy]
    assert any(differs)  # ... and the reference is the SFT adapter, a different one


@pytest.mark.parametrize("kind", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_trained_adapters_load_in_the_chat_engines(kind: str, full_loop: dict, tiny_model_path: Path) -> None:
    from chat_app.engines import AdapterRef, EngineConfig, SamplingConfig, create_engine

    if kind == "vllm":
        pytest.importorskip("vllm")
    config = EngineConfig(max_model_len=512, max_lora_rank=8, dtype="float32", enforce_eager=True, kv_cache_gib=0.25,
                          cpu_threads=1)

    async def serve() -> list:
        engine = create_engine(kind, tiny_model_path, config)
        try:
            await engine.add_adapter(AdapterRef(f"ppo-test-{kind}", full_loop["ppo"].adapter_dir))
            await engine.add_adapter(AdapterRef(f"sft-test-{kind}", full_loop["sft"].adapter_dir))
            msgs = [{"role": "user", "content": "Hello! How are you?"}]
            replies = await engine.generate(msgs, 2, adapter=f"ppo-test-{kind}", sampling=SamplingConfig(max_tokens=4, seed=1))
            replies += await engine.generate(msgs, 1, adapter=f"sft-test-{kind}", sampling=SamplingConfig(max_tokens=4, seed=1))
            return replies
        finally:
            await engine.close()

    assert len(asyncio.run(serve())) == 3


def test_training_never_imports_chat_app() -> None:
    """Imports flow one way (feedback_db <- training <- chat_app): no training module imports chat_app,
    at any depth (the vLLM sampler comes in as a factory)."""
    import ast
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "training"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "chat_app"]
    assert not offenders, offenders
    modules = ["training"] + [f"training.{p.stem}" for p in sorted(root.glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'chat_app')\n"
            "assert not loaded, loaded\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root.parent)
    assert run.returncode == 0, run.stderr[-2000:]


def test_engine_sampler_sends_the_fitted_prompt_ids_to_the_engine(tiny_model_path: Path) -> None:
    """chat_app's EngineSampler generates from the ids PPO scores, never from re-rendered messages."""
    from chat_app.engines import EngineConfig, SamplingConfig, create_engine
    from chat_app.engines.rollout_sampler import EngineSampler
    from training.chat_data import encode_prompt, encode_prompt_fitted, stop_token_ids

    engine = create_engine("hf", tiny_model_path, EngineConfig(max_model_len=64, max_lora_rank=8, dtype="float32",
                                                                cpu_threads=1))
    tok = engine.format.tokenizer
    long = [{"role": "system", "content": "Be brief."}] + [
        {"role": r, "content": f"turn {i} " + "water " * 20} for i, r in enumerate(["user", "assistant"] * 3)] + [
        {"role": "user", "content": "last question"}]
    fitted = encode_prompt_fitted(tok, long, 48)
    assert len(encode_prompt(tok, long)) > 64 >= 48 >= len(fitted)  # rendered whole, it would not even fit the engine
    sent = []
    original = engine.generate_tokens

    async def recording(prompt_ids, n=1, **kwargs):
        sent.append(list(prompt_ids))
        settings.append(kwargs["sampling"])
        return await original(prompt_ids, n, **kwargs)

    settings = []
    engine.generate_tokens = recording
    sampler = EngineSampler(engine, stop_token_ids(tok), max_new_tokens=8,
                            sampling=ReplySampling(temperature=0.8, frequency_penalty=0.5, min_p=0.1))
    try:
        replies = sampler.sample([fitted], [long])
        assert sent == [fitted] and len(replies) == 1 and 1 <= len(replies[0]) <= 8
        # Sampled as PPO scores them: its temperature, the penalty and min-p reach the engine.
        s = settings[0]
        assert (s.temperature, s.frequency_penalty, s.min_p, s.max_tokens) == (0.8, 0.5, 0.1, 8)
        # Token ids in, the same reply as from the messages that render to them (greedy).
        msgs = [{"role": "user", "content": "Hello! How are you?"}]
        greedy = SamplingConfig(temperature=0.0, max_tokens=6)
        by_ids = sampler._loop.run_until_complete(original(engine.format.render(msgs), 1, sampling=greedy))
        by_messages = sampler._loop.run_until_complete(engine.generate(msgs, 1, sampling=greedy))
        assert by_ids[0].token_ids == by_messages[0].token_ids
    finally:
        sampler.close()
