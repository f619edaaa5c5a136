"""The whole loop on the tiny model, with `alignloop serve` running throughout.

Users chat, give thumbs, compare and rank through the app (gradio_client, as a browser would) →
`alignloop round` runs in its own process → the candidate appears in the server → Compare votes
for it → the server auto-promotes it → the next reply comes from the new adapter. And the same
with a round SIGKILLed halfway: nothing is registered and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from scripts.server_process import ServerProcess, start_server, stop_server
from tests.app_server import ADMIN_PASSWORD, count_rows, fetch_rows
from training.config import LoraSettings, PPOConfig, RewardConfig, SFTConfig
from training.round_config import RoundConfig

AUTO_PROMOTE_AFTER = 5  # a floor; the sequential test itself needs 10 straight wins from >= 5 voters
VOTES_TO_PROMOTE = 10  # the default PromotionPolicy: e-value 20.3 >= 1/alpha at 10 wins, 0 losses
SAMPLING = ("", 0.9, 0.95, 16)  # system prompt, temperature, top-p, max tokens
LORA = LoraSettings(r=4, alpha=8)


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("loop-app")
    server = start_server(tiny_model_path, workdir, engine="hf",
                          serve_args=["--max-new-tokens", "16", "--rate-limit", "0",
                                      "--auto-promote-after", str(AUTO_PROMOTE_AFTER)],
                          env={"ALIGNLOOP_CACHE": str(workdir / "cache"), "ALIGNLOOP_ADMIN_PASSWORD": ADMIN_PASSWORD})
    yield server
    stop_server(server)


def round_config(server: ServerProcess, tiny_model_path: Path, rounds_dir: Path, ppo_iterations: int) -> Path:
    """A round small enough for two CPU cores, with gates any candidate passes; written as JSON for the CLI."""
    config = RoundConfig(
        db=str(server.db_path), base_model=str(tiny_model_path), rounds_dir=str(rounds_dir), device="cpu",
        heldout_fraction=0.3, min_pairs=4, min_prompts=3, rm_floor=-1.0, rm_tolerance=1.0, eval_prompts=2,
        min_rm_eval_pairs=1, min_eval_prompts=1,
        eval_max_new_tokens=4, max_kl=1e9, min_reward_gain=-1e9, max_ptx_ppl_increase=1e9,
        sft=SFTConfig(epochs=1.0, batch_size=8, max_length=96, progress=False, lora=LORA),
        reward=RewardConfig(epochs=1.0, groups_per_batch=8, max_length=96, progress=False, lora=LORA),
        ppo=PPOConfig(iterations=ppo_iterations, rollout_batch=4, minibatch=2, ppo_epochs=1, max_new_tokens=4,
                      max_length=96, ptx_batch=2, ptx_max_length=64, progress=False, sampler="hf", lora=LORA),
    )
    path = rounds_dir.parent / f"round-{ppo_iterations}.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


def start_round(config_path: Path, log: Path) -> subprocess.Popen:
    """`alignloop round` as a separate process, the way cron or an operator runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "chat_app.cli", "round", "--config", str(config_path)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def like(client: Client, index: int, liked: bool) -> None:
    """Click 👍/👎 under message `index` of this session's chat, as the browser does.

    gradio_client cannot attach a click's event data (gr.LikeData), so this sends the queue
    request the browser sends, through the client's own endpoint and session.
    """
    fn_index = client._infer_fn_index("/like", None)
    endpoint = client.endpoints[fn_index]
    helper = client.new_helper(fn_index)
    endpoint.make_predict(helper)(*endpoint.insert_empty_state(),
                                  event_data={"index": index, "value": "", "liked": liked})  # raises on an app error


def live_and_candidate(client: Client) -> tuple[str, str]:
    """(live, candidate) as the Dashboard shows them to the admin; candidate 'none' when there is none."""
    outputs = client.predict(ADMIN_PASSWORD, api_name="/dashboard")
    summary = next(o for o in outputs if isinstance(o, str) and "Live:" in o)
    live = summary.split("Live:** `")[1].split("`")[0]
    return live, summary.split("Candidate:** `")[1].split("`")[0]


def newest_reply_version(db: Path) -> str:
    return fetch_rows(db, "SELECT v.name FROM messages m JOIN model_versions v ON v.id = m.model_version_id "
                          "WHERE m.role = 'assistant' ORDER BY m.id DESC LIMIT 1")[0][0]


def battle_replies(db: Path) -> dict[str, str]:
    """The newest Compare battle's two stored replies: {text: version name}."""
    ((prompt,),) = fetch_rows(db, "SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                                  "WHERE c.source = 'compare' AND m.role = 'user' ORDER BY m.id DESC LIMIT 1")
    rows = fetch_rows(db, "SELECT m.content, v.name FROM messages m JOIN model_versions v "
                          "ON v.id = m.model_version_id WHERE m.parent_id = ?", [prompt])
    return {text.strip(): name for text, name in rows}


@pytest.fixture(scope="module")
def users_gave_feedback(server: ServerProcess) -> dict[str, int]:
    """Two users use every tab of the app: chat with thumbs and reasons, a better reply, Compare, Rank."""
    alice, bob = Client(server.url, verbose=False), Client(server.url, verbose=False)
    for i, (text, liked) in enumerate([("How do I boil an egg?", True), ("Tell me about the moon.", False),
                                       ("Give me a tip for sleeping well.", True)]):
        alice.predict(text, [], *SAMPLING, api_name="/chat")
        like(alice, 2 * i + 1, liked)  # message 2i+1 is the reply to the i-th question
        alice.predict(["helpful"] if liked else ["wrong / made up"], f"comment {i}", api_name="/feedback")
    alice.predict("Put it in boiling water for nine minutes, then in cold water.", api_name="/demonstrate")
    for i in range(6):
        bob.predict(f"Ranking prompt {i}: how can I learn faster?", 3, *SAMPLING, api_name="/rank")
        assert "saved" in bob.predict("1", "2", "3", None, None, None, None, None, None, api_name="/submit_ranking")
    for choice in ("A", "B"):
        bob.predict("Which is better, tea or coffee?", *SAMPLING, api_name="/compare")
        bob.predict(api_name=f"/vote_{choice}")
    counts = {table: count_rows(server.db_path, f"SELECT COUNT(*) FROM {table}")
              for table in ("ratings", "comparisons", "rankings", "demonstrations")}
    assert counts["ratings"] >= 3 and counts["rankings"] == 6 and counts["comparisons"] == 2
    assert counts["demonstrations"] == 1
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM ratings WHERE reasons LIKE '%made up%'") == 1
    return counts


def vote_for_candidate_until_promoted(server: ServerProcess, candidate: str, limit: int = 40) -> int:
    """Compare battles by five voters (the promotion test counts distinct voters) in turn; each always
    prefers the candidate's reply (a tie when it cannot tell them apart)."""
    voters = [Client(server.url, verbose=False) for _ in range(5)]
    decisive = 0
    for i in range(limit):
        carol = voters[decisive % len(voters)]  # the next voter after each counted vote
        if live_and_candidate(carol)[0] == candidate:
            return decisive
        a, b, *_ = carol.predict(f"Battle {i}: what should I cook tonight?", *SAMPLING, api_name="/compare")
        sides = battle_replies(server.db_path)
        a_is, b_is = sides.get(a.strip()), sides.get(b.strip())
        if {a_is, b_is} >= {candidate} and a_is != b_is:
            choice = "A" if a_is == candidate else "B"
            decisive += 1
        else:  # live vs live (candidate not loaded yet) or texts not told apart: no preference
            choice = "tie"
        reveal = carol.predict(api_name=f"/vote_{choice}")
        assert "was" in reveal
    raise AssertionError(f"{candidate} was not promoted after {limit} battles ({decisive} decisive votes)")


def test_feedback_round_candidate_votes_promotion_then_replies_from_the_new_adapter(
        server: ServerProcess, users_gave_feedback: dict, tiny_model_path: Path, tmp_path: Path) -> None:
    client = Client(server.url, verbose=False)
    assert live_and_candidate(client)[1] == "none"
    config = round_config(server, tiny_model_path, tmp_path / "rounds", ppo_iterations=2)
    proc = start_round(config, tmp_path / "round.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "round.log").read_text()[-3000:]
    output = (tmp_path / "round.log").read_text()
    assert "succeeded" in output, output[-3000:]

    # The candidate appears in the running server (the registry is its source of truth).
    live, candidate = live_and_candidate(client)
    assert candidate.startswith("policy-r") and live.startswith("base:"), (live, candidate)
    client.predict("Still there?", [], *SAMPLING, api_name="/chat")
    assert newest_reply_version(server.db_path).startswith("base:")  # live is unchanged until promotion

    decisive = vote_for_candidate_until_promoted(server, candidate)
    assert decisive == VOTES_TO_PROMOTE
    # The router follows the registry every 0.25 s and the candidate's adapter is already loaded.
    deadline, served = time.monotonic() + 10, []
    while not served or served[-1] != candidate:
        assert time.monotonic() < deadline, f"replies still from {served} 10 s after the promotion"
        client.predict("And now?", [], *SAMPLING, api_name="/chat")
        served.append(newest_reply_version(server.db_path))
    client.predict("And the next one?", [], *SAMPLING, api_name="/chat")
    assert newest_reply_version(server.db_path) == candidate
    assert "Server error" not in server.log() and "Traceback" not in server.log()


def test_a_round_killed_halfway_registers_nothing_and_the_server_is_unaffected(
        server: ServerProcess, users_gave_feedback: dict, tiny_model_path: Path, tmp_path: Path) -> None:
    client = Client(server.url, verbose=False)
    before = live_and_candidate(client)
    versions = count_rows(server.db_path, "SELECT COUNT(*) FROM model_versions")
    client.predict("One more question before the round", [], *SAMPLING, api_name="/chat")  # new data for a new round
    rounds_dir = tmp_path / "rounds"
    proc = start_round(round_config(server, tiny_model_path, rounds_dir, ppo_iterations=200), tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while not list(rounds_dir.glob("round-*/work/ppo/metrics.jsonl")):  # in the middle of PPO
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the round never reached PPO"
        time.sleep(0.2)
    # Meanwhile the server answers as usual.
    client.predict("Are you still answering during training?", [], *SAMPLING, api_name="/chat")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert count_rows(server.db_path, "SELECT COUNT(*) FROM model_versions") == versions
    assert live_and_candidate(client) == before
    assert not list(rounds_dir.glob("round-*/adapters"))
    history = client.predict("Hello after the crash", [], *SAMPLING, api_name="/chat")[1]
    assert len(history) >= 2
    killed = count_rows(server.db_path, "SELECT MAX(id) FROM training_rounds")
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM training_rounds WHERE id = ? AND status = 'running'",
                      [killed]) == 1  # until the next round finds it

    # The next round marks it failed, removes its folder and produces a candidate.
    proc = start_round(round_config(server, tiny_model_path, rounds_dir, ppo_iterations=2), tmp_path / "next.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "next.log").read_text()[-3000:]
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM training_rounds WHERE id = ? AND status = 'failed'",
                      [killed]) == 1
    assert not (rounds_dir / f"round-{killed:04d}").exists()
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM model_versions") > versions
    assert live_and_candidate(client)[1] == f"policy-r{killed + 1}"
