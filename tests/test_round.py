"""Retraining rounds on the tiny model: round 0 (SFT), a full round, gates, the lock, interruption, auto-promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from feedback_db import FeedbackStore, ModelRegistry, Reply, import_rows
from training.base_models import resolve_model
from training.config import LoraSettings, PPOConfig, RewardConfig, SFTConfig
from training.round import (
    RoundBusyError,
    round_dir_name,
    round_lock,
    run_round,
    seed_starter_set,
    split_heldout,
    starter_rows,
)
from training.round_config import RoundConfig, load_round_config
from training.round_data import judge_split
from training.round_promotion import maybe_auto_promote

LORA = LoraSettings(r=4, alpha=8)


@pytest.fixture
def config(tiny_model_path: Path, tmp_path: Path) -> RoundConfig:
    """A round small enough for two shared CPU cores: one SFT/RM epoch, two PPO iterations of 4 rollouts;
    gates any candidate passes once there is a held-out prompt and pair (rm_floor -1: any accuracy)."""
    return RoundConfig(
        db=str(tmp_path / "feedback.db"), base_model=str(tiny_model_path), rounds_dir=str(tmp_path / "rounds"),
        device="cpu", heldout_fraction=0.3, min_pairs=4, min_prompts=3, rm_floor=-1.0, rm_tolerance=1.0,
        min_rm_eval_pairs=1, eval_prompts=2, min_eval_prompts=1, eval_max_new_tokens=4, max_kl=1e9,
        min_reward_gain=-1e9, max_ptx_ppl_increase=1e9, bootstrap_resamples=200,
        sft=SFTConfig(epochs=1.0, batch_size=8, max_length=96, progress=False, lora=LORA),
        reward=RewardConfig(epochs=1.0, groups_per_batch=8, max_length=96, progress=False, lora=LORA),
        ppo=PPOConfig(iterations=2, rollout_batch=4, minibatch=2, ppo_epochs=1, max_new_tokens=4, max_length=96,
                      ptx_batch=2, ptx_max_length=64, progress=False, sampler="hf", lora=LORA),
    )


def add_ranked_feedback(config: RoundConfig, prompts: int = 8, k: int = 3, thumbs: bool = False) -> None:
    """Conversations with k replies per prompt from the live base model, ranked by a user (and with
    ``thumbs``, the best reply rated 👍 and the worst 👎), through the store API."""
    with FeedbackStore(config.db) as store:
        live = ModelRegistry(store).ensure_base_policy(resolve_model(config.base_model).name)
        user = store.ensure_user("rater")
        for i in range(prompts):
            conv = store.create_conversation(user)
            q = store.add_user_message(conv, user, f"Question number {i}: how do I stay focused?")
            replies = [store.add_reply(conv, user, q, text, Reply(live.id)) for text in
                       (f"Take short breaks every {20 + i} minutes and remove distractions.", "Focus.", "no")[:k]]
            store.record_ranking(user, replies)
            if thumbs:
                store.record_rating(user, replies[0], 1)
                store.record_rating(user, replies[-1], -1)


def versions(db: str, kind: str) -> list[str]:
    with FeedbackStore(db) as store:
        return [v.name for v in ModelRegistry(store).list(kind) if not v.name.startswith(("base:", "external:"))]


def rounds(db: str) -> list:
    with FeedbackStore(db) as store:
        return ModelRegistry(store).rounds()


# --------------------------------------------------------------------------- #
# Starter set
# --------------------------------------------------------------------------- #


def test_starter_set_loads_and_seeds_once(tmp_db_path: Path) -> None:
    assert len(starter_rows("sft")) >= 20 and len(starter_rows("prompts")) >= 20 and len(starter_rows("preferences")) >= 16
    with FeedbackStore(tmp_db_path) as store:
        first = seed_starter_set(store)
        assert all(n > 0 for n in first.values())
        assert seed_starter_set(store) == {"sft": 0, "prompts": 0, "preferences": 0}  # content-keyed: a no-op


def test_the_evaluation_and_ppo_sample_as_the_app_serves_unless_told_otherwise() -> None:
    from training.config import ConfigError, apply_overrides
    from training.sampling import APP_SAMPLING, GREEDY

    assert RoundConfig().reply_sampling() == APP_SAMPLING.with_samples(2)
    ppo = RoundConfig().ppo
    assert (ppo.temperature, ppo.frequency_penalty, ppo.min_p) == (APP_SAMPLING.temperature,
                                                                   APP_SAMPLING.frequency_penalty, APP_SAMPLING.min_p)
    assert apply_overrides(RoundConfig(), ["ppo.temperature=1", "ppo.min_p=0"]).ppo.temperature == 1.0  # the old way

    assert RoundConfig(eval_sampling="greedy").reply_sampling() == GREEDY
    for bad in ({"eval_samples": 0}, {"eval_sampling": "beam"}):
        with pytest.raises(ConfigError, match="eval_samples"):
            RoundConfig(**bad)


def test_heldout_split_is_stable() -> None:
    rows = [{"prompt": f"p{i}"} for i in range(200)]
    train, held = split_heldout(rows, 0.25)
    assert 25 < len(held) < 75 and len(train) + len(held) == 200
    assert split_heldout(rows[::-1], 0.25)[1] == held[::-1]  # a prompt's side depends only on its text
    grown_train, grown_held = split_heldout(rows + [{"prompt": "new"}], 0.25)
    assert all(r in grown_held for r in held) and all(r in grown_train for r in train)  # new prompts move none
    few = [{"prompt": "a"}, {"prompt": "b"}]
    assert len(split_heldout(few, 0.0, min_heldout=1)[1]) == 1 and split_heldout(few[:1], 0.0, min_heldout=1)[1] == []


def test_judge_split_shares_no_prompt_with_the_proxy() -> None:
    groups = [{"prompt": f"p{i}", "completions": ["a", "b"], "pairs": [[0, 1]]} for i in range(40)]
    thumbs = [{"prompt": f"p{i}", "completion": "a", "label": True} for i in range(40)]
    thumbs += [{"prompt": f"only thumbs {i}", "completion": "b", "label": False} for i in range(10)]
    split = judge_split(groups, thumbs)
    proxy, judge = {g["prompt"] for g in split.proxy_groups}, {g["prompt"] for g in split.judge_groups}
    assert not proxy & judge and proxy | judge == {g["prompt"] for g in groups} and 10 < len(judge) < 30
    assert {t["prompt"] for t in split.judge_thumbs} & {f"p{i}" for i in range(40)} == judge  # thumbs follow their prompt
    assert not {t["prompt"] for t in split.proxy_thumbs} & {t["prompt"] for t in split.judge_thumbs}
    assert len(split.proxy_thumbs) + len(split.judge_thumbs) == 50
    held = set(r["prompt"] for r in split_heldout(groups, 0.5)[1])
    assert judge != held  # a second, independent hash: not the held-out split again
    two = judge_split(groups[:2])
    assert len(two.proxy_groups) == len(two.judge_groups) == 1 and judge_split(groups[:1]).judge_groups == []


# --------------------------------------------------------------------------- #
# Rounds
# --------------------------------------------------------------------------- #


def test_round0_is_sft_only_and_registers_a_candidate_that_loads(config: RoundConfig, tiny_model_path: Path) -> None:
    with FeedbackStore(config.db) as store:
        import_rows(store, starter_rows("sft")[:8], "sft", source="starter")  # demonstrations only, no votes yet
    result = run_round(config)
    assert result.status == "succeeded" and result.metrics["mode"] == "sft-only"
    with FeedbackStore(config.db) as store:
        registry = ModelRegistry(store)
        candidate = registry.get(result.candidate)
        assert candidate.status == "candidate" and candidate.base_model == resolve_model(config.base_model).name
        assert candidate.parent_id == registry.live().id and candidate.round_id == result.round_id
        assert registry.get_round(result.round_id).status == "succeeded"
    folder = Path(candidate.adapter_path)
    assert folder.parent == Path(config.rounds_dir) / round_dir_name(result.round_id) / "adapters"
    assert not (folder.parents[1] / "work").exists()
    from training.adapters import attach_adapter, load_base

    base, _, _ = load_base(SFTConfig(base_model=str(tiny_model_path), device="cpu"))
    attach_adapter(base, "served", folder, None, trainable=False)  # loads on the base
    assert result.report_path and "sft-only" in result.report_path.read_text()
    assert len(result.metrics["fixed_samples"]) == 4 and "fixed prompts" in result.report_path.read_text()

    again = run_round(config)  # nothing new since, same configuration: nothing to do, nothing recorded
    assert again.status == "skipped" and "no new feedback" in again.reason and len(rounds(config.db)) == 1
    config.sft.epochs = 2.0  # a changed configuration deserves a new try on the same data
    retry = run_round(config)
    assert retry.status == "succeeded" and versions(config.db, "policy") == [result.candidate, retry.candidate]


def test_a_later_round_fine_tunes_on_its_new_demonstrations_and_as_many_replayed(config: RoundConfig) -> None:
    with FeedbackStore(config.db) as store:
        import_rows(store, starter_rows("sft")[:8], "sft", source="starter")
    first = run_round(config)
    assert first.metrics["sft_rows"] == {"new": 8, "replayed": 0, "old": 0}
    with FeedbackStore(config.db) as store:
        ModelRegistry(store).promote(first.candidate)
        import_rows(store, starter_rows("sft")[8:11], "sft", source="starter")
    second = run_round(config)
    assert second.metrics["sft_rows"] == {"new": 3, "replayed": 3, "old": 8}
    assert second.metrics["sft_demonstrations"] == 11 and second.metrics["sft"]["init_adapter"]


def test_interrupted_round_registers_nothing_and_the_next_one_runs(config: RoundConfig) -> None:
    add_ranked_feedback(config, thumbs=True)
    # A round killed earlier (its process died while 'running'), with half-written work on disk.
    with FeedbackStore(config.db) as store:
        stale = ModelRegistry(store).start_round({"rounds_dir": str(Path(config.rounds_dir).resolve())}, 0)
    stale_dir = Path(config.rounds_dir) / round_dir_name(stale.id) / "work" / "ppo"
    stale_dir.mkdir(parents=True)
    (stale_dir / "adapter_model.safetensors").write_bytes(b"half")

    def kill_at_commit(step: str, round_dir: Path) -> None:
        if step == "commit":  # the worst moment: adapters already moved into place
            assert any((round_dir / "adapters").iterdir())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_round(config, step_hook=kill_at_commit)
    killed = rounds(config.db)[-1]
    assert killed.status == "stopped" and versions(config.db, "policy") == [] and versions(config.db, "reward") == []
    killed_dir = Path(config.rounds_dir) / round_dir_name(killed.id)
    assert not (killed_dir / "work").exists() and not (killed_dir / "adapters").exists()
    assert rounds(config.db)[0].status == "failed"  # the stale one was recovered by that run
    assert not stale_dir.parents[1].exists()

    seen: dict[str, list[str]] = {}

    def read_training_data(step: str, round_dir: Path) -> None:
        if step == "evaluate":  # what each reward model and PPO trained on
            for name in ("rm_preferences", "judge_preferences", "prompts", "rm_thumbs", "judge_thumbs"):
                path = round_dir / "work" / "data" / f"{name}.jsonl"
                seen[name] = [json.dumps(json.loads(line)["prompt"]) for line in path.read_text().splitlines()]

    result = run_round(config, step_hook=read_training_data)
    assert result.status == "succeeded" and result.metrics["mode"] == "rm+ppo"
    m = result.metrics
    assert m["data"]["preference_pairs"] == 24 and m["reward_model"]["eval_pairs"] > 0
    # Each 👍/👎 is used once, as its own row (not also folded into pairs), and never from a held-out prompt.
    assert m["data"]["thumbs"] == 16 and m["data"]["train_thumbs"] == 16 - 2 * m["data"]["heldout_preference_groups"]
    assert m["ppo"]["iterations"] == 2 and len(m["ppo"]["curve"]) == 2
    for key in ("reward_live", "reward_candidate", "reward_gain", "reward_gain_ci", "judge_reward_gain",
                "judge_reward_gain_ci", "kl_to_reference", "ptx_ppl_increase"):
        assert key in m["evaluation"]
    # Judged on replies drawn as the app serves them (two per prompt by default), not only greedy ones.
    assert m["evaluation"]["sampling"].startswith("2 sampled per prompt (temperature 0.8")
    assert m["gates_passed"] is True and set(m["gates"]) == {"reward_model", "kl", "reward_gain", "ptx_perplexity"}
    assert m["auto_promotable"] is True
    assert all(g["verdict"] == "passed" for g in m["gates"].values())
    # No previous reward model: the judge is a second one, trained on prompts the PPO proxy never saw.
    assert m["judge"]["kind"] == "split" and m["judge"]["train_prompts"] >= 1
    assert seen["rm_preferences"] and seen["judge_preferences"]
    assert not set(seen["rm_preferences"]) & set(seen["judge_preferences"])
    assert set(seen["rm_thumbs"]) == set(seen["rm_preferences"]) and set(seen["judge_thumbs"]) == set(seen["judge_preferences"])
    assert m["reward_model"]["train_pairs"] + m["judge"]["train_pairs"] <= 24 - m["reward_model"]["eval_pairs"]
    # The candidate is judged on held-out prompts only: none that PPO or either reward model trained on.
    judged = {json.dumps(s["prompt"]) for s in m["samples"]}
    assert judged and m["evaluation"]["heldout_prompts"] == len(judged)
    assert not judged & (set(seen["rm_preferences"]) | set(seen["judge_preferences"]) | set(seen["prompts"]))
    with FeedbackStore(config.db) as store:
        registry = ModelRegistry(store)
        candidate = registry.get(result.candidate)
        assert candidate.metrics["gates_passed"] is True and "evaluation" in candidate.metrics
        reward = registry.live("reward")
        assert reward.round_id == result.round_id and Path(reward.adapter_path, "scalar_head.json").is_file()
    report = result.report_path.read_text()
    assert "Candidate vs live" in report and "Sample replies" in report
    assert (result.round_dir / "ppo_curves.png").is_file() and "ppo_curves.png" in report
    assert (result.round_dir / "rm_accuracy.png").is_file() and "rm_accuracy.png" in report
    assert "Before and after on the fixed prompts" in report
    assert [s["prompt"] for s in result.metrics["fixed_samples"]] == [r["prompt"] for r in starter_rows("prompts")[:4]]

    # Round 2 warm-starts from that reward model and is judged against it on the same held-out pairs.
    add_ranked_feedback(config, prompts=4)
    config.rm_tolerance = -1.0  # demand an impossible improvement: the round must stop at the RM gate
    second = run_round(config)
    assert second.status == "stopped" and "worse than the previous one" in second.reason
    assert second.metrics["reward_model"]["warm_start"] == reward.name
    assert versions(config.db, "policy") == [result.candidate]


def test_reward_model_below_the_floor_stops_the_round(config: RoundConfig) -> None:
    add_ranked_feedback(config)
    config.rm_floor = 1.01
    result = run_round(config)
    assert result.status == "stopped" and "below the floor" in result.reason
    assert versions(config.db, "policy") == [] and versions(config.db, "reward") == []
    assert not (result.round_dir / "work").exists()
    assert rounds(config.db)[-1].metrics["reward_model"]["eval_accuracy"] < 1.01


def test_a_second_round_at_once_is_refused(config: RoundConfig) -> None:
    with round_lock(Path(config.rounds_dir).resolve()):
        with pytest.raises(RoundBusyError, match="another training round is running"):
            run_round(config)
    assert not Path(config.db).exists() or rounds(config.db) == []


def test_cli_round_reports_busy_and_shows_config(config: RoundConfig, tmp_path: Path) -> None:
    from chat_app.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["round", "--db", config.db, "--show-config", "--set", "ppo.iterations=3",
                                "--set", "min_votes=7"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["ppo"]["iterations"] == 3 and data["min_votes"] == 7
    path = tmp_path / "round.json"
    path.write_text(shown.output)
    assert load_round_config(path).ppo.iterations == 3
    with round_lock(Path(config.rounds_dir).resolve()):
        busy = runner.invoke(app, ["round", "--db", config.db, "--rounds-dir", config.rounds_dir])
    assert busy.exit_code == 75


# --------------------------------------------------------------------------- #
# Auto-promotion
# --------------------------------------------------------------------------- #


def _vote(store: FeedbackStore, user: str, candidate_id: int, live_id: int, candidate_wins: bool, i: int) -> None:
    conv = store.create_conversation(user)
    q = store.add_user_message(conv, user, f"Compare these, question {i}")
    a = store.add_reply(conv, user, q, f"candidate reply {i}", Reply(candidate_id))
    b = store.add_reply(conv, user, q, f"live reply {i}", Reply(live_id))
    store.record_comparison(user, a, b, "A" if candidate_wins else "B")


def test_auto_promotion_needs_passed_gates_and_users_preference(tmp_db_path: Path) -> None:
    """maybe_auto_promote is opt-in, never promotes a candidate whose gates did not all pass (e.g. not
    enough evidence), and otherwise leaves the decision to feedback_db's test on the Compare votes."""
    config = RoundConfig(base_model="gemma-3-270m", auto_promote=True, min_votes=10)
    with FeedbackStore(tmp_db_path) as store:
        registry = ModelRegistry(store)
        live = registry.ensure_base_policy("gemma-3-270m")
        unproven = registry.register("policy-old", base_model="gemma-3-270m", metrics={
            "gates_passed": False, "gates": {"reward_gain": {"verdict": "not enough evidence"}}})
        voters = [store.ensure_user(f"voter-{k}") for k in range(5)]
        for i in range(20):
            _vote(store, voters[i % 5], unproven.id, live.id, True, i)
        assert maybe_auto_promote(store, config) is None  # users prefer it, but its gates did not pass

        candidate = registry.register("policy-new", base_model="gemma-3-270m", metrics={"gates_passed": True})
        for i in range(3):
            _vote(store, voters[i % 5], candidate.id, live.id, True, 100 + i)
        assert maybe_auto_promote(store, config) is None  # 3 < min_votes decisive votes
        for i in range(3, 20):
            _vote(store, voters[i % 5], candidate.id, live.id, True, 100 + i)
        off = RoundConfig(base_model="gemma-3-270m", auto_promote=False, min_votes=10)
        assert maybe_auto_promote(store, off) is None  # auto-promotion is opt-in
        six_voters = RoundConfig(base_model="gemma-3-270m", auto_promote=True, min_votes=10, promote_min_voters=6)
        assert maybe_auto_promote(store, six_voters) is None  # the test's settings come from the round config
        assert maybe_auto_promote(store, config) == "policy-new"  # 20 straight wins from 5 voters
        assert registry.live().name == "policy-new" and registry.get("policy-new").metrics["auto_promoted"]
        assert maybe_auto_promote(store, config) is None  # nothing left to promote


# --------------------------------------------------------------------------- #
# Real process death and the cron script
# --------------------------------------------------------------------------- #

KILLED_ROUND = """
import os, signal, sys
from training.round import run_round
from training.round_config import load_round_config

def die(step, round_dir):
    if step == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)

run_round(load_round_config(sys.argv[1]), step_hook=die)
"""


def test_a_round_killed_with_sigkill_is_cleaned_up_by_the_next(config: RoundConfig, tmp_path: Path) -> None:
    import subprocess
    import sys

    add_ranked_feedback(config)
    path = tmp_path / "round.json"
    path.write_text(json.dumps(config.to_dict()))
    proc = subprocess.run([sys.executable, "-c", KILLED_ROUND, str(path), "ppo"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (killed,) = rounds(config.db)
    assert killed.status == "running"  # what a dead process leaves behind
    killed_dir = Path(config.rounds_dir) / round_dir_name(killed.id)
    assert (killed_dir / "work" / "rm" / "adapter_model.safetensors").is_file()  # its RM was written aside

    config.rm_floor = 1.01  # the next round only needs to get going; stop it cheaply at the RM gate
    result = run_round(config)
    assert result.status == "stopped" and result.metrics["recovered_rounds"] == [killed.id]
    assert rounds(config.db)[0].status == "failed" and not killed_dir.exists()
    assert versions(config.db, "policy") == [] and versions(config.db, "reward") == []


def test_cron_script_exits_75_while_a_round_runs(config: RoundConfig, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "scripts" / "retrain_round.sh"
    log = tmp_path / "cron.log"
    env = {**os.environ, "ALIGNLOOP_BIN": str(Path(sys.executable).with_name("alignloop")),
           "ALIGNLOOP_ROUNDS_LOG": str(log)}
    with round_lock(Path(config.rounds_dir).resolve()):
        proc = subprocess.run([str(script), "--db", config.db, "--rounds-dir", config.rounds_dir], env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75
    assert "another training round is running" in log.read_text()


def test_starter_round_runs_sft_then_rm_then_ppo_from_the_sft_adapter(config: RoundConfig, monkeypatch) -> None:
    config.min_prompts = 8
    published: list[dict] = []  # what the app's banner would have read, in order
    record = ModelRegistry.record_progress
    monkeypatch.setattr(ModelRegistry, "record_progress",
                        lambda self, round_id, progress: (published.append(progress), record(self, round_id, progress)))
    result = run_round(config, seed_starter=True)
    assert result.status == "succeeded" and result.metrics["mode"] == "sft+rm+ppo", result.reason
    steps = [p["step"] for p in published if "done" not in p]
    assert steps[:4] == ["export", "sft", "reward_model", "judge"] and "ppo" in steps
    for what, step in (("SFT", "sft"), ("reward model", "reward_model"), ("PPO", "ppo")):
        last = [p for p in published if p.get("what") == what and p["step"] == step][-1]
        assert last["done"] == last["total"] > 0 and last["eta_s"] == 0
    assert "progress" not in rounds(config.db)[-1].metrics  # a finished round shows no progress
    assert result.metrics["seeded"]["sft"] > 0 and result.metrics["sft"]["init_adapter"] == ""
    sft_kept = Path(result.round_dir) / "adapters" / f"sft-r{result.round_id}"
    assert result.metrics["ppo"]["start"].endswith("work/sft")  # PPO starts from the SFT adapter ...
    assert result.metrics["ppo"]["reference"] == str(sft_kept)  # ... stays near it, and it is kept for later rounds
    assert (sft_kept / "adapter_config.json").is_file()
    assert result.metrics["data"]["demonstrations"] == len(starter_rows("sft"))
    timing = result.metrics["step_seconds"]  # where the time went, step by step
    assert {"export", "sft", "reward_model", "judge", "ppo", "evaluate", "register"} <= set(timing)
    assert all(seconds >= 0 for seconds in timing.values()) and timing["sft"] > 0 and timing["ppo"] > 0
    assert "## Where the time went" in result.report_path.read_text()
    with FeedbackStore(config.db) as store:
        registry = ModelRegistry(store)
        registry.promote(result.candidate)
        user = store.ensure_user("alice")
        conv = store.create_conversation(user)
        store.add_user_message(conv, user, "A new prompt after round 1")
    config.max_kl = -1.0  # a gate no candidate can pass: registered for the operator, never auto-promoted
    nxt = run_round(config)  # the live policy has seen every demonstration: no SFT this time
    assert nxt.metrics["data"]["new_demonstrations"] == 0 and "sft" not in nxt.metrics
    assert nxt.status == "succeeded" and nxt.metrics["mode"] == "rm+ppo"
    assert nxt.metrics["gates"]["kl"]["verdict"] == "failed" and nxt.metrics["gates_passed"] is False
    assert nxt.metrics["auto_promotable"] is False
    # A previous reward model exists: it judges the candidate (PPO optimised the new one, not it).
    judge = nxt.metrics["judge"]
    assert judge["kind"] == "previous" and judge["name"] == f"reward-r{result.round_id}"
    assert nxt.metrics["evaluation"]["judge"] == judge["name"]
    assert nxt.metrics["evaluation"]["judge_reward_gain"] is not None
    assert "judge_candidate" in nxt.metrics["samples"][0]
    # New demonstrations under a PPO-trained live policy, by default (sft_after_ppo=skip): no SFT step; PPO
    # continues from live, anchored to the lineage's old SFT adapter, the demonstrations in its ptx term.
    with FeedbackStore(config.db) as store:
        import_rows(store, [{"prompt": "Name a fruit.", "completion": "An apple."}], "sft", source="later")
    config.max_kl = 10.0
    later = run_round(config)
    assert later.status == "succeeded" and later.metrics["mode"] == "rm+ppo", later.reason
    assert "sft" not in later.metrics and "1 new demonstrations" in later.metrics["sft_skipped"]
    assert later.metrics["ppo"]["reference"] == str(sft_kept)
    with FeedbackStore(config.db) as store:
        assert later.metrics["ppo"]["start"] == ModelRegistry(store).live("policy").adapter_path
    assert nxt.metrics["gates"]["reward_model_vs_previous"]["verdict"] == "passed"
    with FeedbackStore(config.db) as store:
        assert ModelRegistry(store).get(nxt.candidate).metrics["gates_passed"] is False
    assert nxt.metrics["reward_model"]["warm_start"] == f"reward-r{result.round_id}"
    # The second PPO round starts from the live PPO policy, but its KL is still to round 1's SFT adapter.
    with FeedbackStore(config.db) as store:
        live_path = ModelRegistry(store).get(result.candidate).adapter_path
        assert ModelRegistry(store).get(nxt.candidate).metrics["reference_adapter"] == str(sft_kept)
    assert nxt.metrics["ppo"]["start"] == live_path and nxt.metrics["ppo"]["reference"] == str(sft_kept)


def test_cli_round_with_the_starter_set_then_a_promotion_check(config: RoundConfig, tmp_path: Path) -> None:
    from chat_app.cli import app

    path = tmp_path / "round.json"
    path.write_text(json.dumps(config.to_dict()))
    runner = CliRunner()
    # No prompt hashes into the held-out set (only the one preference prompt held out so that the reward
    # model is judged on something), and too few pairs for a reward-model verdict: the candidate is not
    # judged on training prompts instead; it is registered with gates not passed, its reward model not live.
    no_evidence = ["--set", "min_prompts=8", "--set", "heldout_fraction=0", "--set", "min_eval_prompts=2",
                   "--set", "min_rm_eval_pairs=1000"]
    ran = runner.invoke(app, ["round", "--config", str(path), "--seed-starter", *no_evidence])
    assert ran.exit_code == 0, ran.output
    assert "round 1 succeeded" in ran.output and "report:" in ran.output
    (done,) = rounds(config.db)
    gates, held = done.metrics["gates"], done.metrics["data"]["heldout_prompts"]
    assert held < 2 and done.metrics["evaluation"]["heldout_prompts"] == len(done.metrics["samples"]) == held
    assert gates["reward_gain"]["verdict"] == "not enough evidence" and gates["reward_gain"]["n"] == held
    assert gates["reward_model"]["verdict"] == "not enough evidence" and done.metrics["gates_passed"] is False
    assert done.metrics["auto_promotable"] is False  # too few held-out units: never left to the users
    report = Path(done.report_path).read_text()
    assert "**not enough evidence**" in report and f"held-out prompts: {held}, need at least 2" in report
    with FeedbackStore(config.db) as store:
        registry = ModelRegistry(store)
        assert registry.get(done.metrics["candidate"]).metrics["gates_passed"] is False
        assert registry.live("reward") is None and len(versions(config.db, "reward")) == 1
    check = runner.invoke(app, ["round", "--config", str(path), "--promote-only", "--set", "auto_promote=true"])
    assert check.exit_code == 0 and "no candidate qualifies" in check.output  # gates not passed, no votes yet
    again = runner.invoke(app, ["round", "--config", str(path), *no_evidence])
    assert again.exit_code == 0 and "skipped" in again.output
