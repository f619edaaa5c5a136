"""scripts/bench_loop.py: the simulated users' noise model, the gold rule, the statistics, round 0's
registration, and the whole benchmark on the tiny model (`--tiny`, a subprocess: the app, round 0 on the
starter set promoted by the operator, two real users' rounds, Compare, promotion, evaluation)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feedback_db import FeedbackStore, ModelRegistry
from scripts.bench_loop import (
    BenchLoopConfig,
    check_options,
    compare_gold,
    gold_win_rate,
    load_gold,
    new_round_summary,
    parse_args,
    proxy_accuracy,
    register_round0_adapter,
    split_prompts,
    starter_prompt_texts,
)
from scripts.gold_preferences import (
    first_human_turn,
    is_gold_part,
    rule_components,
    rule_gold,
    rule_prompts,
    rule_edit,
    rule_reasons,
)
from scripts.simulated_users import (
    Action,
    NoiseModel,
    SimulatedUser,
    mix_weights,
    parse_reveal,
    plackett_luce_order,
    plan_actions,
    preference_probability,
)
from tests.app_server import count_rows
from tests.engine_contract import make_lora_adapter
from training.base_models import resolve_model
from training.round import RoundRunner, seed_starter_set, starter_rows
from training.round_config import RoundConfig

ROOT = Path(__file__).resolve().parents[1]


# -- the noise model ----------------------------------------------------------------------------


def test_bradley_terry_probability_on_hand_computed_values() -> None:
    assert preference_probability(3.0, 2.5, 0.5) == pytest.approx(1 / (1 + math.exp(-1)))  # σ(1) = 0.7311
    assert preference_probability(2.0, 3.0, 0.25) == pytest.approx(1 / (1 + math.exp(4)))  # σ(-4) = 0.0180
    assert preference_probability(1.0, 0.0, 0.0) == 1.0 and preference_probability(0.0, 1.0, 0.0) == 0.0
    assert preference_probability(1.0, 1.0, 0.0) == 0.5
    assert preference_probability(9.0, -9.0, math.inf) == 0.5  # the null user


def test_plackett_luce_with_two_replies_draws_the_bradley_terry_probability() -> None:
    rng = random.Random(0)
    draws = 20_000
    firsts = sum(plackett_luce_order([1.5, 1.0], 0.5, rng)[0] == 0 for _ in range(draws))
    assert firsts / draws == pytest.approx(preference_probability(1.5, 1.0, 0.5), abs=0.015)


def test_noiseless_and_null_orders() -> None:
    rng = random.Random(1)
    assert plackett_luce_order([0.1, 3.0, 2.0, -1.0], 0.0, rng) == [1, 2, 0, 3]
    tops = [plackett_luce_order([10.0, 0.0, 0.0], math.inf, rng)[0] for _ in range(3000)]
    assert all(abs(tops.count(i) / 3000 - 1 / 3) < 0.04 for i in range(3))  # no preference at all
    noise = NoiseModel(temperature=0.0, threshold=3.0)
    assert noise.thumbs_up(3.5, rng) and not noise.thumbs_up(2.5, rng)


def test_action_plans_and_reveals() -> None:
    weights = mix_weights("chat:3,demonstrate:1,rank:2,compare:2")
    plan = plan_actions(weights, 6, random.Random(0))
    assert len(plan) == 6 and set(plan) == {"chat", "demonstrate", "rank", "compare"}
    with pytest.raises(ValueError, match="unknown action"):
        mix_weights("chat:1,vote:2")
    assert parse_reveal("Thanks! **A** was `policy-r1`, **B** was `base:tiny`.") == ("policy-r1", "base:tiny")


class RecordingClient:
    """A stand-in for gradio_client.Client: canned replies, every call recorded."""

    def __init__(self, reply: str) -> None:
        self.reply, self.calls = reply, []

    def reset_session(self) -> None:
        pass

    def predict(self, *args: object, api_name: str) -> object:
        self.calls.append((api_name, args))
        history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": self.reply}]
        return ("", history) if api_name == "/chat" else (history,)


def test_a_demonstration_is_saved_without_nul_characters_as_the_app_asks() -> None:
    def make(reply: str) -> tuple[SimulatedUser, RecordingClient]:
        client = RecordingClient(reply)
        return SimulatedUser("u", client, rule_gold, NoiseModel(0.0, 3.0), random.Random(0), ("", 1.0, 1.0, 8),
                             best_of=2), client

    user, client = make("Bake\x00 the bread.")
    assert user.act("demonstrate", "How do I bake bread?").demonstrations == 1
    assert client.calls[-1] == ("/demonstrate", ("Bake the bread.",))
    user, client = make("\x00\x00 ")  # nothing left to save: a person would not save it either
    assert user.act("demonstrate", "How do I bake bread?").demonstrations == 0
    assert all(name != "/demonstrate" for name, _ in client.calls)


# -- the gold rule ------------------------------------------------------------------------------


def test_rule_gold_scores_each_part() -> None:
    prompt = "How do I bake bread at home?"
    good = "Mix flour, water, yeast and salt, knead, let it rise, then bake the bread at home for 40 minutes."
    assert rule_gold(prompt, good) == 4.0
    assert rule_gold(prompt, "") == 0.0
    cut = rule_components(prompt, "Mix flour and water, then bake the bread and")
    assert cut["complete"] == 0.0 and cut["on_topic"] == 2 / 3  # bake, bread of {bake, bread, home}
    repeated = rule_components(prompt, "Bake the bread.\nBake the bread.\nBake the bread.")
    assert repeated["non_repetitive"] == pytest.approx(1 - max(4 / 7, 2 / 3))  # 4 of 7 trigrams, 2 of 3 lines
    long = rule_components(prompt, " ".join(["bread"] * 90) + ".")
    assert long["concise"] == pytest.approx(0.5)  # 90 words: 1 - 30 / 60
    assert rule_reasons(prompt, "Something else entirely") == ["cut off", "off topic"]
    assert len(rule_prompts()) == len(set(rule_prompts())) >= 100


def test_the_rule_users_better_reply_drops_an_unfinished_last_sentence() -> None:
    prompt = "How do I bake bread at home?"
    cut = "Mix flour and water. Knead it well! Then bake the bread for forty"
    assert rule_edit(prompt, cut) == "Mix flour and water. Knead it well!"
    assert rule_gold(prompt, rule_edit(prompt, cut)) > rule_gold(prompt, cut)
    assert rule_edit(prompt, "Bake it at 220 degrees.") == "Bake it at 220 degrees."  # complete: saved as it is
    assert rule_edit(prompt, "Yes. Mix flour and water and") == "Yes. Mix flour and water and"  # too little left
    assert rule_edit(prompt, "Use 3.5 cups of flour and") == "Use 3.5 cups of flour and"  # a decimal point ends nothing


def test_hh_split_is_fixed_and_opening_turns_are_extracted() -> None:
    transcript = "\n\nHuman: How do I fix a flat tyre?\n\nAssistant: Which bike?\n\nHuman: A road bike.\n\nAssistant:"
    assert first_human_turn(transcript) == "How do I fix a flat tyre?"
    share = sum(is_gold_part(f"prompt {i}") for i in range(2000)) / 2000
    assert 0.45 < share < 0.55 and is_gold_part("prompt 7") == is_gold_part("prompt 7")


# -- statistics and options ---------------------------------------------------------------------


def test_gold_win_rate_counts_ties_apart_with_a_wilson_interval() -> None:
    result = gold_win_rate([[3.0], [2.0], [1.0], [4.0], [2.0]], [[1.0], [2.0], [2.0], [0.0], [1.0]])
    assert (result["wins"], result["losses"], result["ties"]) == (3, 1, 1)
    assert result["rate"] == 0.75
    assert result["ci_low"] == pytest.approx(0.3006, abs=1e-3) and result["ci_high"] == pytest.approx(0.9544, abs=1e-3)


def test_gold_win_rate_with_several_replies_per_prompt_pairs_them_in_order_and_resamples_prompts() -> None:
    # Reply i against the baseline's reply i: prompt 0 wins 2 of 2; prompt 1 wins 1, loses 1; prompt 2 ties once.
    result = gold_win_rate([[2.0, 3.0], [1.0, 0.0], [1.0, 2.0]], [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    assert (result["wins"], result["losses"], result["ties"], result["prompts"]) == (4, 1, 1, 3)
    assert result["rate"] == 0.8 and result["interval"] == "bootstrap over prompts"
    assert 0.0 <= result["ci_low"] <= 0.8 <= result["ci_high"] <= 1.0
    # The same 40 pairs as 40 prompts of one reply (Wilson) or 4 prompts of ten identical replies: the
    # clustered interval is wider, since its prompts are the independent units.
    flat = gold_win_rate([[1.0]] * 30 + [[0.0]] * 10, [[0.5]] * 40)
    clustered = gold_win_rate([[1.0] * 10] * 3 + [[0.0] * 10], [[0.5] * 10] * 4)
    assert flat["rate"] == clustered["rate"] == 0.75
    assert clustered["ci_high"] - clustered["ci_low"] > 1.5 * (flat["ci_high"] - flat["ci_low"])


def test_compare_gold_judges_the_candidates_side_of_each_users_pair() -> None:
    def vote(versions: tuple[str, str], choice: str, gold: tuple[float, float] | None) -> Action:
        return Action("compare", "u", "p", compare_votes=1, versions=versions, choice=choice, gold=gold)

    votes = [vote(("cand", "live"), "A", (2.0, 1.0)),   # gold: win; voted for
             vote(("live", "cand"), "A", (3.0, 1.0)),   # candidate is B, gold 1 < 3: loss; voted against
             vote(("live", "cand"), "A", (1.0, 2.0)),   # gold: win (label noise voted against it)
             vote(("cand", "live"), "B", (1.0, 1.0)),   # gold tie
             vote(("cand", "live"), "tie", None)]       # identical texts: no gold pair, no vote
    result = compare_gold(votes, "cand")
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 1)
    assert (result["voted_for"], result["voted_against"]) == (1, 3)
    assert compare_gold([], "cand")["rate"] is None


def test_proxy_accuracy_on_gold_distinct_pairs_only() -> None:
    # prompt 1: gold 1 < 2 < 3, proxy gets (0,1) and (0,2) right, (1,2) wrong; prompt 2: a gold tie is skipped,
    # and a proxy tie on a gold-distinct pair is wrong.
    result = proxy_accuracy([[0.0, 2.0, 1.0], [5.0, 5.0, 1.0]], [[1.0, 2.0, 3.0], [2.0, 2.0, 1.0]])
    assert (result["correct"], result["pairs"]) == (4, 5)


def test_options_mirror_the_config_and_the_prompt_split_keeps_evaluation_prompts_away() -> None:
    cfg = parse_args(["--rounds", "5", "--round-set", "ppo.iterations=8", "--round-set", "min_pairs=4", "--null",
                      "--noise-temperature", "0.25", "--round0-set", "sft.epochs=1"])
    assert cfg == BenchLoopConfig(rounds=5, round_set=["ppo.iterations=8", "min_pairs=4"], null=True,
                                  noise_temperature=0.25, round0_set=["sft.epochs=1"])
    assert cfg.baseline == "round0"
    check_options(cfg)
    for bad in (["--baseline", "base", "--round0-set", "sft.epochs=1"], ["--baseline", "base", "--round0-adapter", "x"],
                ["--seed-starter"], ["--baseline", "live"]):
        with pytest.raises(SystemExit):
            check_options(parse_args(bad))
    users, held = split_prompts(rule_prompts(), 0.3, 10)
    assert len(held) == 10 and not set(users) & set(held) and len(users) > 70
    # Round 0 trains on every starter-set prompt: none of them may be an evaluation prompt.
    trained = starter_prompt_texts()
    assert len(trained) > 300 and "How do I bake bread at home?" not in trained
    assert any(p in trained for p in split_prompts(rule_prompts(), 0.5, 64)[1])  # without the exclusion they would be
    users, held = split_prompts(rule_prompts(), 0.5, 64, trained)
    assert len(held) >= 48 and not set(held) & trained and not set(users) & set(held)
    assert trained & set(rule_prompts()) <= set(users)  # the users still send them
    assert load_gold("scripts.gold_preferences:rule_gold") is rule_gold
    with pytest.raises(SystemExit, match="package.module:function"):
        load_gold("rule_gold")


# -- round 0 ------------------------------------------------------------------------------------


def test_a_reused_round0_adapter_is_registered_as_the_round_would_have(tiny_model_path: Path, tmp_path: Path) -> None:
    adapters = tmp_path / "earlier" / "rounds" / "round-0001" / "adapters"
    policy = make_lora_adapter(tiny_model_path, adapters / "policy-r1", seed=1, rank=4)
    sft = make_lora_adapter(tiny_model_path, adapters / "sft-r1", seed=2, rank=4)
    db = tmp_path / "feedback.db"
    base_name = resolve_model(str(tiny_model_path)).name
    with FeedbackStore(db) as store:
        seed_starter_set(store)  # what `alignloop demo` does
        base = ModelRegistry(store).ensure_base_policy(base_name)  # what the app does on start
    cfg = BenchLoopConfig(out=str(tmp_path), base_model=str(tiny_model_path), round0_adapter=str(policy))
    name, summary = register_round0_adapter(cfg, db)
    assert summary["status"] == "succeeded" and summary["candidate"] == name and "reused" in summary["reason"]
    with FeedbackStore(db, create=False) as store:
        registry = ModelRegistry(store)
        version = registry.get(name)
        assert (version.status, version.parent_id, version.base_model) == ("candidate", base.id, base_name)
        assert version.adapter_path == str(policy.resolve())
        # The next round reads the lineage as if round 0 had run here: no second SFT on the starter
        # demonstrations, and KL measured to round 0's SFT adapter.
        runner = RoundRunner(RoundConfig(base_model=str(tiny_model_path)), store, registry, 0, 0, tmp_path / "r", None)
        assert runner.demonstrations_at_last_sft(version) == len(starter_rows("sft"))
        assert runner.sft_reference_of(version) == str(sft.resolve())
    # Without an `sft-rN` beside it, the adapter is its own reference (an SFT-only round 0).
    lone = make_lora_adapter(tiny_model_path, tmp_path / "lone", seed=3, rank=4)
    other = tmp_path / "other"
    other.mkdir()
    with FeedbackStore(other / "feedback.db") as store:
        ModelRegistry(store).ensure_base_policy(base_name)
    name, _ = register_round0_adapter(BenchLoopConfig(out=str(other), round0_adapter=str(lone)), other / "feedback.db")
    with FeedbackStore(other / "feedback.db", create=False) as store:
        assert ModelRegistry(store).get(name).metrics["mode"] == "sft-only"
    with pytest.raises(SystemExit, match="not a complete LoRA adapter"):
        register_round0_adapter(BenchLoopConfig(out=str(other), round0_adapter=str(tmp_path / "missing")),
                                other / "feedback.db")


# -- the whole benchmark on the tiny model ------------------------------------------------------


def test_a_round_killed_before_it_recorded_its_end_is_reported_as_killed(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer did it in a real run) leaves the round "running" in the registry until the
    next round marks it interrupted; the table says the process was killed, not that it still runs."""
    db = tmp_path / "feedback.db"
    with FeedbackStore(db) as store:
        registry = ModelRegistry(store)
        done = registry.start_round({})
        registry.finish_round(done.id, "succeeded", metrics={})
        before = [r.id for r in registry.rounds()]
        registry.start_round({})  # the killed round: started, never finished
    assert new_round_summary(db, before, -9, "")["status"] == "killed (exit -9)"
    assert new_round_summary(db, [], 0, "")["status"] == "running"  # a clean exit is left as recorded


def test_tiny_benchmark_runs_every_step_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_loop.py"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 3, results.get("stopped")

    # Round 0: the starter set, trained by `alignloop round --seed-starter` before any user acted, promoted
    # by the operator, and the baseline of every later row.
    zero, users_rows = results["rounds"][0], results["rounds"][1:]
    baseline = results["baseline"]
    assert baseline["mode"] == "round0" and baseline["base"].startswith("base:")
    assert baseline["policy"] == results["round0_policy"] == zero["candidate"] == zero["live_after"] == "policy-r1"
    assert zero["round"] == 0 and zero["status"] == "succeeded" and zero["live_before"] == baseline["base"]
    assert zero["round_metrics"]["data"]["new_demonstrations"] == len(starter_rows("sft"))
    assert zero["round_metrics"]["mode"] == "sft+rm+ppo"  # the starter set's preference pairs train the RM and PPO
    assert zero["signals"]["votes"] == 0 and zero["cumulative_votes"] == 0
    assert zero["gold_win_rate"]["against"] == baseline["base"] and zero["seconds"]["round"] > 0
    assert "policy-r1 is live" in zero["promotion_cli"]

    for row in users_rows:
        assert row["status"] == "succeeded" and row["candidate"].startswith("policy-r"), row["reason"]
        assert row["gold_win_rate"]["against"] == baseline["policy"]
        signals = row["signals"]
        for kind in ("chat_turns", "compare_votes", "rankings", "demonstrations"):
            assert signals[kind] > 0, (kind, signals)
        assert signals["thumbs_up"] + signals["thumbs_down"] > 0 and signals["candidate_votes"] > 0
        assert row["proxy_accuracy"] is not None  # the round's reward adapter was loaded and scored
        assert {"live", "candidate"} <= set(row["gold_win_rate"])
        pairs = row["compare_gold"]  # the candidate's gold side of the users' own Compare pairs
        assert pairs["voted_for"] + pairs["voted_against"] > 0 and pairs["wins"] + pairs["losses"] + pairs["ties"] > 0
        assert row["round_metrics"]["kl_to_sft"] is not None and row["round_metrics"]["ptx_ppl_after"] is not None
        assert "promot" in row["promotion_cli"] and row["live_after"]
        assert set(row["seconds"]) == {"users", "round", "compare", "promote", "evaluate"}
    assert users_rows[0]["live_before"] == baseline["policy"]  # the users' rounds start from round 0
    assert users_rows[1]["cumulative_votes"] > users_rows[0]["cumulative_votes"] > 0
    table = (out / "results.md").read_text()
    assert "| round | status |" in table and "| 0 (#1) | succeeded |" in table and "| 2 (#3) | succeeded |" in table
    assert (out / "gold_win_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 (#2) |" in done.stdout  # the table is printed as the run goes
    # Everything went through the app: its database holds the starter set, the operator's promotion of
    # round 0 (before any user's feedback) and the users' feedback.
    db = out / "feedback.db"
    assert count_rows(db, "SELECT COUNT(*) FROM demonstrations") > len(starter_rows("sft"))
    assert count_rows(db, "SELECT COUNT(*) FROM registry_log l JOIN model_versions v ON v.id = l.version_id "
                          "WHERE l.action = 'promote' AND l.actor = 'operator' AND v.name = 'policy-r1' "
                          "AND l.at < (SELECT MIN(created_at) FROM ratings)") == 1
    for table_name in ("ratings", "comparisons", "rankings"):
        assert count_rows(db, f"SELECT COUNT(*) FROM {table_name}") > 0, table_name
    print(f"bench_loop --tiny: {wall:.0f} s (the run itself: {results['wall_seconds']:.0f} s)")


def test_judge_adapters_rejudges_saved_versions_on_the_held_out_prompts(tiny_model_path, tmp_path, capsys) -> None:
    """scripts/judge_adapters.py on the tiny model: one seeded stream for every version, so an adapter judged
    against itself ties on every reply; a different adapter is judged reply against reply, with the rule's
    parts; a folder that is not an adapter is refused before anything loads."""
    from scripts.judge_adapters import main
    from tests.engine_contract import make_lora_adapter

    a = make_lora_adapter(tiny_model_path, tmp_path / "a", seed=0)
    b = make_lora_adapter(tiny_model_path, tmp_path / "b", seed=1)
    options = ["--base-model", str(tiny_model_path), "--device", "cpu", "--eval-prompts", "3",
               "--eval-samples", "2", "--eval-max-new-tokens", "6", "--json", str(tmp_path / "judged.json")]
    assert main([f"a={a}", f"same={a}", f"b={b}", "base=base", *options]) == 0
    results = json.loads((tmp_path / "judged.json").read_text())
    same, other = results["versions"]["same"]["vs_baseline"], results["versions"]["b"]["vs_baseline"]
    assert (same["wins"], same["losses"], same["ties"], same["rate"]) == (0, 0, 6, None)
    assert other["wins"] + other["losses"] + other["ties"] == 6 and other["prompts"] == 3
    assert results["replies"]["same"] == results["replies"]["a"] != results["replies"]["b"]
    assert set(results["versions"]["base"]["rule_components"]) == {"complete", "non_repetitive", "concise", "on_topic"}
    assert "baseline a" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a saved adapter"):
        main([f"a={a}", f"x={tmp_path}", *options])
