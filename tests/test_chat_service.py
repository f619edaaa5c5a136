"""ChatService + ServingRouter against the real transformers engine on the tiny model and a real
SQLite store: chat, feedback, Compare, Rank, limits, engine failures, and hot-swap under load."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest

from chat_app.engines import EngineConfig, SamplingConfig, create_engine
from chat_app.limits import LimitConfig, UserFacingError
from chat_app.router import RouterConfig, ServingRouter
from chat_app.service import ChatService, ServiceConfig
from feedback_db import FeedbackStore, ModelRegistry, PromotionPolicy
from tests.engine_contract import make_lora_adapter

GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)
NO_LIMITS = LimitConfig(0, 0, 0, 0)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(tiny_model_path, root / f"policy-{i}", seed=i) for i in range(2)]


@pytest.fixture
def broken(tmp_path) -> Path:
    """An adapter folder whose config is not JSON: no engine can load it."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    return folder


def run_with_service(tiny_model_path, db_path, body, router_config: RouterConfig | None = None, **service_kwargs):
    """Start engine + router + service on a fresh loop, run `body(service)`, shut down."""

    async def main():
        store = FeedbackStore(db_path)
        engine = create_engine("hf", tiny_model_path, EngineConfig(max_model_len=256))
        router = ServingRouter(engine, store, "tiny",
                               router_config or RouterConfig(poll_interval_s=0.05, release_idle_after_s=0.2))
        await router.start()
        service = ChatService(store, router, ServiceConfig(default_sampling=GREEDY, **service_kwargs))
        try:
            return await body(service)
        finally:
            await router.stop()
            await engine.close()
            store.close()

    return asyncio.run(main())


async def _drain(stream):
    return [u async for u in stream]


def test_chat_streams_stores_and_takes_feedback(tiny_model_path, tmp_db_path):
    async def body(svc: ChatService):
        uid = svc.ensure_user("alice")
        updates = await _drain(svc.chat(uid, "Hello there", system_prompt="Be brief."))
        final = updates[-1]
        assert final.finished and final.reply_id and not final.error
        assert len(updates) >= 2  # streamed: partial updates before the final one
        # The first update says the turn was accepted (ids, no text yet), before any token is decoded.
        assert (updates[0].text, updates[0].user_message_id) == ("", final.user_message_id)
        row = svc.store.db["messages"].get(final.reply_id)
        assert row["model_version_id"] == svc.router.live.version_id
        assert row["finish_reason"] in ("stop", "length") and row["completion_tokens"] > 0
        assert row["content"] == final.text and "<end_of_turn>" not in row["content"]
        # a follow-up turn continues the same conversation
        follow = await _drain(svc.chat(uid, "And then?", conversation_id=final.conversation_id,
                                       parent_id=final.reply_id))
        ctx = svc.store.context(follow[-1].reply_id)
        assert [m["role"] for m in ctx.as_chat()] == ["system", "user", "assistant", "user", "assistant"]
        # regenerate: a sibling reply to the same user turn
        regen = await _drain(svc.regenerate(uid, final.user_message_id))
        assert svc.store.db["messages"].get(regen[-1].reply_id)["parent_id"] == final.user_message_id
        svc.rate(uid, final.reply_id, -1, reasons=["too short"], comment="meh")
        svc.demonstrate(uid, final.user_message_id, "Hi! How can I help?", replaces_reply_id=final.reply_id)
        counts = svc.store.stats()["counts"]
        assert counts["ratings"] == 1 and counts["demonstrations"] == 1
        with pytest.raises(UserFacingError):
            svc.rate("bob-never-seen", final.reply_id, 1)

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_compare_battle_live_vs_candidate_and_vote(tiny_model_path, tmp_db_path, adapters):
    with FeedbackStore(tmp_db_path) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-r1", adapter_path=adapters[0], base_model="tiny")

    async def body(svc: ChatService):
        uid = svc.ensure_user("carol")
        assert svc.router.candidate and svc.router.candidate.name == "policy-r1"
        battles = await _drain(svc.battle(uid, "Pick a colour", rng=random.Random(1)))
        battle = battles[-1]
        assert battle.done and all(battle.reply_ids) and sorted(battle.versions) == ["base:tiny", "policy-r1"]
        with pytest.raises(UserFacingError):
            svc.vote(uid, battles[0] if not battles[0].done else battle, "maybe")
        versions = svc.vote(uid, battle, "A")
        assert versions == battle.versions
        row = svc.store.db["comparisons"].rows_where().__next__()
        assert (row["message_a"], row["message_b"], row["choice"]) == (battle.reply_ids[0], battle.reply_ids[1], "A")

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_rank_k_replies_and_submit(tiny_model_path, tmp_db_path):
    async def body(svc: ChatService):
        uid = svc.ensure_user("dave")
        updates = await _drain(svc.rank_stream(uid, "Tell me a story", 4,
                                               sampling=SamplingConfig(temperature=1.0, max_tokens=8, seed=3)))
        assert len(updates) == 1 and updates[0].done  # the transformers engine makes the K replies as one batch
        ids, texts = updates[0].reply_ids, updates[0].texts
        assert len(ids) == len(texts) == 4 and 0 not in ids
        ranking = svc.submit_ranking(uid, list(reversed(ids)))
        items = list(svc.store.db.query("SELECT message_id FROM ranking_items WHERE ranking_id = ? ORDER BY position",
                                        [ranking]))
        assert [i["message_id"] for i in items] == list(reversed(ids))
        with pytest.raises(UserFacingError):
            await _drain(svc.rank_stream(uid, "x", 10))

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_rank_streams_its_replies_where_the_engine_batches_streams(tiny_model_path, tmp_db_path):
    """With an engine that decodes concurrent streams together, the K replies stream side by side (updates
    arrive before all are done) and end stored as K siblings, each with its own seed."""
    async def body(svc: ChatService):
        svc.engine.batches_streams = True  # the vLLM path, on the tiny transformers engine
        uid = svc.ensure_user("erin")
        updates = []
        async for ranking in svc.rank_stream(uid, "Tell me a joke", 3,
                                             sampling=SamplingConfig(temperature=1.0, max_tokens=8, seed=5)):
            updates.append((list(ranking.reply_ids), list(ranking.texts), ranking.done))
        assert updates[-1][2] and 0 not in updates[-1][0]
        assert any(not done and 0 in ids for ids, _, done in updates)  # partial updates came first
        ids = updates[-1][0]
        rows = list(svc.store.db.query(f"SELECT parent_id, sampling FROM messages WHERE id IN ({','.join('?' * 3)})", ids))
        assert len({r["parent_id"] for r in rows}) == 1
        assert sorted(json.loads(r["sampling"])["seed"] for r in rows) == [5, 6, 7]
        svc.submit_ranking(uid, ids)

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_a_nul_the_model_emits_reaches_the_user_as_it_is_stored(tiny_model_path, tmp_db_path):
    """SQLite text cannot hold NUL, so the store gets U+FFFD; the user must be sent that same text (the
    OpenAI API's test once caught a random tiny-model reply whose NUL came back to the client but not to the
    store). The real engine's output gets a NUL put into each chunk."""
    async def body(svc: ChatService):
        stream, generate = svc.engine.stream, svc.engine.generate

        async def stream_with_nul(*args, **kwargs):
            async for chunk in stream(*args, **kwargs):
                yield dataclasses.replace(chunk, text="\x00" + chunk.text)

        async def generate_with_nul(*args, **kwargs):
            return [dataclasses.replace(c, text=c.text + "\x00") for c in await generate(*args, **kwargs)]

        svc.engine.stream, svc.engine.generate = stream_with_nul, generate_with_nul
        uid = svc.ensure_user("nul")
        final = (await _drain(svc.chat(uid, "Hello there")))[-1]
        assert final.text.startswith("\ufffd") and "\x00" not in final.text
        assert svc.store.db["messages"].get(final.reply_id)["content"] == final.text
        ranking = (await _drain(svc.rank_stream(uid, "Tell me a story", 2)))[-1]
        assert all(t.endswith("\ufffd") for t in ranking.texts)
        assert [svc.store.db["messages"].get(i)["content"] for i in ranking.reply_ids] == ranking.texts

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_limits_are_enforced_with_a_readable_message(tiny_model_path, tmp_db_path):
    async def body(svc: ChatService):
        uid = svc.ensure_user("eve")
        with pytest.raises(UserFacingError, match="limit is 50"):
            await _drain(svc.chat(uid, "x" * 51))
        await _drain(svc.chat(uid, "one"))
        await _drain(svc.chat(uid, "two"))
        with pytest.raises(UserFacingError, match="Please wait"):
            await _drain(svc.chat(uid, "three"))

    run_with_service(tiny_model_path, tmp_db_path, body, max_input_chars=50, limits=LimitConfig(generations_per_user=2))


def test_engine_failure_shows_a_clear_message_and_is_stored(tiny_model_path, tmp_db_path):
    async def body(svc: ChatService):
        uid = svc.ensure_user("frank")
        await svc.engine.close()  # a real failure: the engine is gone (the server's watchdog then exits)
        updates = await _drain(svc.chat(uid, "hello"))
        final = updates[-1]
        assert final.finished and final.error and "could not answer" in final.error
        assert svc.store.db["messages"].get(final.reply_id)["finish_reason"] == "error"

    run_with_service(tiny_model_path, tmp_db_path, body, max_input_chars=10_000)


def test_broken_adapter_is_never_served(tiny_model_path, tmp_db_path, broken):
    with FeedbackStore(tmp_db_path) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-broken", adapter_path=broken, base_model="tiny")

    async def body(svc: ChatService):
        assert svc.router.candidate is None and "policy-broken" in svc.router.load_errors
        updates = await _drain(svc.chat(svc.ensure_user("gina"), "hi"))
        assert not updates[-1].error

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_hot_swap_under_concurrent_load(tiny_model_path, tmp_db_path, adapters):
    """Promotion while requests stream: no request fails, in-flight replies keep their version,
    the next request uses the new version, rollback returns, and the old adapter is released."""
    with FeedbackStore(tmp_db_path) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-r1", adapter_path=adapters[0], base_model="tiny")
        reg.promote("policy-r1")
        reg.register("policy-r2", adapter_path=adapters[1], base_model="tiny")

    async def body(svc: ChatService):
        users = [svc.ensure_user(f"load-{i}") for i in range(4)]
        results = []

        async def client(uid: str, n: int) -> None:
            for i in range(n):
                updates = await _drain(svc.chat(uid, f"request {i}"))
                results.append(updates[-1])

        load = [asyncio.create_task(client(u, 3)) for u in users]
        await asyncio.sleep(0.3)
        # promote through the registry from "another process": the poller picks it up
        ModelRegistry(svc.store).promote("policy-r2", actor="test")
        deadline = asyncio.get_running_loop().time() + 5
        while svc.router.live.name != "policy-r2":
            assert asyncio.get_running_loop().time() < deadline, "promotion not picked up within 5 s"
            await asyncio.sleep(0.05)
        await asyncio.gather(*load)
        assert len(results) == 12 and all(r.finished and not r.error for r in results)
        served = {svc.store.db["messages"].get(r.reply_id)["model_version_id"] for r in results}
        assert served <= {ModelRegistry(svc.store).get(n).id for n in ("policy-r1", "policy-r2")}
        after = await _drain(svc.chat(users[0], "after promotion"))
        assert svc.store.db["messages"].get(after[-1].reply_id)["model_version_id"] == \
            ModelRegistry(svc.store).get("policy-r2").id
        assert await svc.rollback(actor="test") == "policy-r1"
        assert svc.router.live.name == "policy-r1"
        await svc.promote("policy-r2", actor="test")
        await asyncio.sleep(0.4)
        await svc.router.sync()
        assert "policy-r1" not in svc.router.loaded()  # idle and retired: released

    run_with_service(tiny_model_path, tmp_db_path, body, limits=NO_LIMITS)


def test_a_request_right_after_a_promotion_elsewhere_gets_the_new_version(tiny_model_path, tmp_db_path, adapters,
                                                                           broken, tmp_path):
    """A promotion by another process (the CLI) is followed before the next request is routed, not at the
    next poll (here an hour away): at once when the engine already holds the version (a preloaded
    candidate), else after loading it, which the request waits for. A version that cannot load, or that
    takes longer than RouterConfig.promotion_wait_s, leaves the request on the old version."""
    with FeedbackStore(tmp_db_path) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-r1", adapter_path=adapters[0], base_model="tiny")

    def served_by(svc: ChatService, reply) -> str:
        version_id = svc.store.db["messages"].get(reply.reply_id)["model_version_id"]
        return svc.store.db["model_versions"].get(version_id)["name"]

    async def body(svc: ChatService):
        uid = svc.ensure_user("alice")
        assert svc.router.candidate.name == "policy-r1"  # preloaded at start
        other = ModelRegistry(svc.store)
        other.promote("policy-r1", actor="cli")
        assert served_by(svc, (await _drain(svc.chat(uid, "right after")))[-1]) == "policy-r1"
        other.register("policy-r2", adapter_path=adapters[1], base_model="tiny")
        other.promote("policy-r2", actor="cli")
        assert "policy-r2" not in svc.router.loaded()
        assert served_by(svc, (await _drain(svc.chat(uid, "not loaded yet")))[-1]) == "policy-r2"
        other.register("policy-broken", adapter_path=broken, base_model="tiny")
        other.promote("policy-broken", actor="cli")
        assert served_by(svc, (await _drain(svc.chat(uid, "cannot load")))[-1]) == "policy-r2"
        assert "policy-broken" in svc.router.load_errors
        svc.router.config.promotion_wait_s = 0.0  # as if the load took longer than the wait
        other.register("policy-r3", adapter_path=shutil.copytree(adapters[0], tmp_path / "r3"), base_model="tiny")
        other.promote("policy-r3", actor="cli")
        assert served_by(svc, (await _drain(svc.chat(uid, "slow load")))[-1]) == "policy-r2"
        await svc.router.sync()  # the load went on without the request (this waits for it)
        assert served_by(svc, (await _drain(svc.chat(uid, "loaded now")))[-1]) == "policy-r3"

    run_with_service(tiny_model_path, tmp_db_path, body, router_config=RouterConfig(poll_interval_s=3600.0),
                     limits=NO_LIMITS)


def test_server_auto_promotes_a_gated_candidate_that_users_prefer(tiny_model_path, tmp_db_path, adapters):
    """Checked after every vote: 5 voters preferring the candidate twice each reach the default test's
    threshold (10 straight wins: e-value 20.3 >= 1/alpha) at the 10th vote, not before."""
    with FeedbackStore(tmp_db_path) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-r1", adapter_path=adapters[0], base_model="tiny", metrics={"gates_passed": True})

    async def body(svc: ChatService):
        voters = [svc.ensure_user(f"voter-{k}") for k in range(5)]
        rng = random.Random(0)
        for i in range(10):
            assert ModelRegistry(svc.store).live().name == "base:tiny", f"promoted after {i} votes, too early"
            uid = voters[i % 5]
            battle = (await _drain(svc.battle(uid, f"question {i}", rng=rng)))[-1]
            assert battle.texts[0].strip() != battle.texts[1].strip()  # identical replies would not count
            svc.vote(uid, battle.user_message_id, "A" if battle.versions[0] == "policy-r1" else "B")
        await svc.router.sync()
        assert svc.router.live.name == "policy-r1"
        record = ModelRegistry(svc.store).get("policy-r1").metrics["auto_promoted"]
        assert (record["wins"], record["losses"], record["voters"]) == (10, 0, 5)
        assert record["e_value"] >= record["threshold"] == 20

    run_with_service(tiny_model_path, tmp_db_path, body, limits=NO_LIMITS,
                     auto_promote=PromotionPolicy(min_votes=6))


def test_promote_refuses_what_this_server_cannot_serve_and_changes_nothing(tiny_model_path, tmp_db_path, broken,
                                                                           adapters):
    with FeedbackStore(tmp_db_path) as store:
        reg = ModelRegistry(store)
        reg.ensure_base_policy("tiny")
        reg.register("policy-broken", adapter_path=broken, base_model="tiny")
        reg.register("policy-other-base", adapter_path=adapters[0], base_model="someone/else")
        reg.register("policy-good", adapter_path=adapters[1], base_model="tiny")
        reg.retire(reg.register("policy-withdrawn", adapter_path=adapters[1], base_model="tiny").name)
        reg.register("policy-gone", adapter_path=broken.parent / "deleted-folder", base_model="tiny")
        reg.register("policy-gates-failed", adapter_path=adapters[0], base_model="tiny",
                     metrics={"gates_passed": False})

    async def body(svc: ChatService):
        offered = {v["name"]: v["label"] for v in svc.promotable_versions()}
        # Candidates on this base whose folder exists: not live, not withdrawn, not on another base.
        assert list(offered) == ["policy-gates-failed", "policy-good", "policy-broken"]
        assert offered["policy-gates-failed"] == "policy-gates-failed (gates not all passed)"
        assert offered["policy-good"] == "policy-good"
        with pytest.raises(UserFacingError, match="cannot be served, so it was not promoted"):
            await svc.promote("policy-broken", actor="op")
        assert [v["name"] for v in svc.promotable_versions()] == ["policy-gates-failed", "policy-good"]  # known bad
        with pytest.raises(UserFacingError, match="trained on someone/else"):
            await svc.promote("policy-other-base", actor="op")
        assert ModelRegistry(svc.store).live().name == "base:tiny" == svc.router.live.name
        assert await svc.promote("policy-good", actor="op") == "policy-good" == svc.router.live.name
        # The version it replaced was live: it is offered (going back two versions is more than Roll back).
        assert {v["name"]: v["label"] for v in svc.promotable_versions()}["base:tiny"] == "base:tiny (was live)"
        # A load error is not forever: fixing the folder and promoting again retries it.
        import shutil
        shutil.rmtree(broken)
        shutil.copytree(adapters[0], broken)
        assert await svc.promote("policy-broken", actor="op") == "policy-broken" == svc.router.live.name

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_a_message_sent_while_a_reply_streams_is_refused_not_forked(tiny_model_path, tmp_db_path):
    async def body(svc: ChatService):
        uid = svc.ensure_user("hana")
        first = await _drain(svc.chat(uid, "first"))
        conv = first[-1].conversation_id
        stream = svc.chat(uid, "second", conversation_id=conv, parent_id=first[-1].reply_id)
        await stream.__anext__()  # the second reply is streaming now
        with pytest.raises(UserFacingError, match="Wait until the reply has finished"):
            await _drain(svc.chat(uid, "third", conversation_id=conv, parent_id=first[-1].reply_id))
        await _drain(stream)
        with pytest.raises(UserFacingError, match="Wait until the reply has finished"):
            # What a Send during a stream used to send: no parent, which made a second root.
            await _drain(svc.chat(uid, "fourth", conversation_id=conv, parent_id=None))
        roots = svc.store.db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND parent_id IS NULL",
                                     [conv]).fetchone()[0]
        assert roots == 1

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_a_turn_left_unanswered_by_a_crash_is_replaced_by_the_next_message(tiny_model_path, tmp_db_path):
    """A server killed mid-reply leaves the user's turn stored with no reply (tests/test_fault_server_killed.py).
    The reopened conversation ends on it; the next Send takes its place, as its sibling, instead of being
    refused as a user turn after a user turn."""
    async def body(svc: ChatService):
        uid = svc.ensure_user("ida")
        first = (await _drain(svc.chat(uid, "first")))[-1]
        conv = first.conversation_id
        stranded = svc.store.add_user_message(conv, uid, "lost in the crash", parent_id=first.reply_id)
        assert svc.store.latest_branch(conv).message_ids[-1] == stranded  # what the page reopens on
        again = (await _drain(svc.chat(uid, "asked again", conversation_id=conv, parent_id=stranded)))[-1]
        assert again.error is None and again.finished
        branch = svc.store.latest_branch(conv)
        assert [m["content"] for m in branch.messages[:-1]] == ["first", first.text, "asked again"]
        assert branch.message_ids[-1] == again.reply_id
        # Only a turn that has no reply is replaced: an answered one (a stale tab) is refused as before.
        with pytest.raises(UserFacingError, match="a user message must follow an assistant message"):
            await _drain(svc.chat(uid, "from a stale tab", conversation_id=conv, parent_id=again.user_message_id))
        # The first turn stranded: its replacement is a second root, the conversation's new start.
        alone = await svc._db(svc.store.create_conversation, uid)
        root = svc.store.add_user_message(alone, uid, "never answered")
        restart = (await _drain(svc.chat(uid, "hello again", conversation_id=alone, parent_id=root)))[-1]
        assert [m["content"] for m in svc.store.latest_branch(alone).messages] == ["hello again", restart.text]

    run_with_service(tiny_model_path, tmp_db_path, body)


@pytest.mark.parametrize("kwargs, match", [
    ({"system_prompt": "s" * 30_000}, "system prompt is 30,000 characters"),
    ({"sampling": SamplingConfig(temperature=float("nan"))}, "must be numbers"),
    ({"sampling": SamplingConfig(max_tokens=10**9)}, "between 1 and 4096"),
    ({"text": "bad\x00byte"}, "NUL"),
    ({"text": "lone \ud800 surrogate"}, "UTF-8"),
])
def test_a_refused_message_leaves_nothing_behind(tiny_model_path, tmp_db_path, kwargs, match):
    async def body(svc: ChatService):
        uid = svc.ensure_user("ines")
        args = {"text": "hello", **kwargs}
        with pytest.raises(UserFacingError, match=match):
            await _drain(svc.chat(uid, args.pop("text"), **args))
        with pytest.raises(UserFacingError, match=match):
            await _drain(svc.battle(uid, kwargs.get("text", "hello"), **args))
        assert svc.store.conversations_of(uid) == []

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_a_conversation_longer_than_the_context_drops_old_turns_and_says_so(tiny_model_path, tmp_db_path):
    """max_model_len is 256 here: after a few long turns, the oldest are left out (the reply is not an
    error) and the user is told how many; a single message too long on its own is refused."""
    async def body(svc: ChatService):
        uid = svc.ensure_user("jo")
        parent, conv, notes = None, None, []
        for i in range(6):
            updates = await _drain(svc.chat(uid, f"turn {i} " + "words " * 40, conversation_id=conv, parent_id=parent,
                                            system_prompt="Be brief." if conv is None else None))
            final = updates[-1]
            assert not final.error, final.error
            conv, parent = final.conversation_id, final.reply_id
            notes.append(final.note)
        assert notes[0] is None and notes[-1] and "oldest" in notes[-1]
        kept, dropped = svc.engine.format.fit_messages(svc.store.context(parent).as_chat()[:-1], GREEDY.max_tokens)
        assert kept[0] == {"role": "system", "content": "Be brief."} and kept[1]["role"] == "user" and dropped > 0
        before = svc.store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        with pytest.raises(UserFacingError, match="Your message alone is longer"):
            await _drain(svc.chat(uid, "word " * 600))
        with pytest.raises(UserFacingError, match="Your message alone is longer"):
            await _drain(svc.chat(uid, "word " * 600, conversation_id=conv, parent_id=parent))
        assert svc.store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == before  # nothing stored

    run_with_service(tiny_model_path, tmp_db_path, body, max_input_chars=10_000)


def test_metrics_count_requests_tokens_and_feedback(tiny_model_path, tmp_db_path):
    async def body(svc: ChatService):
        uid = svc.ensure_user("kim")
        final = (await _drain(svc.chat(uid, "hello")))[-1]
        svc.rate(uid, final.reply_id, 1)
        await _drain(svc.rank_stream(uid, "pick one", 2))
        svc.metrics.serving("live", svc.router.live.name)
        text = svc.metrics.render().decode()
        tokens = svc.store.db["messages"].get(final.reply_id)["completion_tokens"]
        assert 'alignloop_requests_total{kind="chat",outcome="ok"} 1.0' in text
        assert 'alignloop_requests_total{kind="rank",outcome="ok"} 1.0' in text
        assert "alignloop_time_to_first_token_seconds_count 1.0" in text
        assert 'alignloop_feedback_total{kind="rating"} 1.0' in text
        assert f'alignloop_version_info{{role="live",version="{svc.router.live.name}"}} 1.0' in text
        generated = [line for line in text.splitlines() if line.startswith("alignloop_generated_tokens_total{")]
        assert float(generated[0].rsplit(" ", 1)[1]) >= tokens > 0

    run_with_service(tiny_model_path, tmp_db_path, body)


def test_model_status_shows_a_running_rounds_progress_until_it_goes_stale(tiny_model_path, tmp_db_path):
    from chat_app.ui.rendering import banner_text

    async def body(svc: ChatService):
        assert await svc.model_status() == {"live": "base:tiny", "bare_base": True, "training": None}
        assert "bare base model" in banner_text(await svc.model_status())
        round_ = svc.registry.start_round({})
        svc.registry.record_progress(round_.id, {"step": "sft", "what": "SFT", "done": 3, "total": 12, "eta_s": 300})
        svc._status = None  # the status is cached for STATUS_TTL_S
        status = await svc.model_status()
        assert status["training"]["done"] == 3 and status["training"]["round_id"] == round_.id
        text = banner_text(status)
        assert "Training the first aligned version" in text and "3/12 (25%), about 5 min left" in text
        svc.STALE_PROGRESS_S = -1.0  # a round whose process died: its progress is not shown forever
        svc._status = None
        assert (await svc.model_status())["training"] is None
        svc.registry.finish_round(round_.id, "stopped")
        assert "progress" not in svc.registry.get_round(round_.id).metrics

    run_with_service(tiny_model_path, tmp_db_path, body)
