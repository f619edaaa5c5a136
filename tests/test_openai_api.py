"""The OpenAI-compatible API (/v1) of a real `alignloop serve` on the tiny model, driven by the official
`openai` client: replies are stored like UI replies (model version, the caller's conversations), a
follow-up extends its conversation, a regenerated reply is a sibling, feedback lands in the database,
and keys, models and unsupported options are refused with OpenAI's error shapes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from chat_app.auth import UsersFile
from chat_app.engines.base import SamplingConfig
from chat_app.openai_api import ApiError, parse_messages, parse_sampling
from scripts.server_process import start_server, stop_server
from tests.app_server import count_rows, fetch_rows


@pytest.fixture(scope="module")
def api(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("openai-api")
    users = UsersFile(workdir / "users.json")  # beside the database: where the server looks without --users-file
    keys = {}
    for name in ("alice", "bob"):
        users.add(name, f"{name}'s password")
        keys[name] = users.add_api_key(name)[0]
    server = start_server(tiny_model_path, workdir, engine="hf",
                          serve_args=["--max-new-tokens", "8", "--rate-limit", "0"],
                          env={"ALIGNLOOP_CACHE": str(workdir / "cache")})
    yield server, users, keys
    stop_server(server)


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key=key, max_retries=0, timeout=120)


def post(server, path: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + path.lstrip("/"), data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_live_alias_and_version(api) -> None:
    server, _, keys = api
    ids = [m.id for m in client(server, keys["alice"]).models.list()]
    assert ids[0] == "alignloop" and any(i.startswith("base:") for i in ids)


def test_a_completion_is_stored_with_its_version_and_a_follow_up_extends_it(api) -> None:
    server, _, keys = api
    alice = client(server, keys["alice"])
    first = alice.chat.completions.create(model="alignloop", max_tokens=8, temperature=0.7,
                                          messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello there"}])
    assert first.id.startswith("chatcmpl-") and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens > 0 and first.usage.prompt_tokens > 0
    text = first.choices[0].message.content
    (reply_id, content, conv, parent, version, sampling), = fetch_rows(
        server.db_path, "SELECT id, content, conversation_id, parent_id, model_version_id, sampling FROM messages "
                        "WHERE client_id = ?", [first.id])
    assert content == text and json.loads(sampling)["temperature"] == 0.7
    assert fetch_rows(server.db_path, "SELECT user_id, source, system_prompt FROM conversations WHERE id = ?",
                      [conv]) == [("alice", "api", "Be brief.")]
    assert fetch_rows(server.db_path, "SELECT status FROM model_versions WHERE id = ?", [version]) == [("live",)]
    assert first.model_extra["alignloop"]["reply_id"] == reply_id

    follow = alice.chat.completions.create(model="alignloop", max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": text.strip()}, {"role": "user", "content": "And then?"}])
    (conv2, parent2), = fetch_rows(server.db_path, "SELECT conversation_id, parent_id FROM messages WHERE client_id = ?",
                                   [follow.id])
    assert conv2 == conv
    assert fetch_rows(server.db_path, "SELECT parent_id, content FROM messages WHERE id = ?", [parent2]) == \
        [(reply_id, "And then?")]

    again = alice.chat.completions.create(model="alignloop", max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert fetch_rows(server.db_path, "SELECT conversation_id, parent_id FROM messages WHERE client_id = ?",
                      [again.id]) == [(conv, parent)]  # a regenerated reply: a sibling of the first


def test_streaming_sends_deltas_that_add_up_to_the_stored_reply(api) -> None:
    server, _, keys = api
    chunks = list(client(server, keys["alice"]).chat.completions.create(
        model="alignloop", max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Tell me something"}]}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert fetch_rows(server.db_path, "SELECT content, finish_reason FROM messages WHERE client_id = ?",
                      [chunks[0].id]) == [(text, chunks[-1].choices[0].finish_reason)]


def test_feedback_on_completions_is_stored_for_its_owner_only(api) -> None:
    server, _, keys = api
    alice = client(server, keys["alice"])
    messages = [{"role": "user", "content": "Which is better?"}]
    a, b = (alice.chat.completions.create(model="alignloop", max_tokens=8, messages=messages) for _ in range(2))
    assert post(server, "/v1/feedback", {"completion_id": a.id, "rating": 1, "reasons": ["helpful"]},
                keys["alice"])[0] == 200
    status, body = post(server, "/v1/feedback", {"completion_ids": [a.id, b.id], "choice": "b"}, keys["alice"])
    assert status == 200 and body["kind"] == "comparison"
    assert post(server, "/v1/feedback", {"completion_id": b.id, "better_reply": "A clear answer."}, keys["alice"])[0] == 200
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM ratings WHERE user_id = 'alice' AND value = 1") == 1
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM comparisons WHERE user_id = 'alice' AND choice = 'B'") == 1
    assert count_rows(server.db_path, "SELECT COUNT(*) FROM demonstrations WHERE user_id = 'alice'") == 1

    status, body = post(server, "/v1/feedback", {"completion_id": a.id, "rating": -1}, keys["bob"])
    assert status == 400 and "no reply of yours" in body["error"]["message"]
    assert post(server, "/v1/feedback", {"completion_id": a.id, "rating": 5}, keys["alice"])[0] == 400


def test_keys_models_and_unsupported_options_are_refused_in_openais_shape(api) -> None:
    server, users, keys = api
    with pytest.raises(openai.AuthenticationError):
        client(server, "alk-nothere-wrong").models.list()
    status, body = post(server, "/v1/chat/completions", {"model": "alignloop", "messages": []}, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    alice = client(server, keys["alice"])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        alice.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        alice.chat.completions.create(model="alignloop", n=2, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="start and end with a user message"):
        alice.chat.completions.create(model="alignloop", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="limit is 4,000"):
        alice.chat.completions.create(model="alignloop", messages=[{"role": "user", "content": "x" * 5000}])

    key_id = next(k.key_id for k in users.read()["bob"].api_keys)
    users.revoke_api_key("bob", key_id)  # takes effect without a restart
    with pytest.raises(openai.AuthenticationError):
        client(server, keys["bob"]).models.list()
    assert "Traceback" not in server.log_path.read_text()


def test_parse_messages_joins_system_and_same_role_turns() -> None:
    system, chat = parse_messages([
        {"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
        {"role": "user", "content": "one"}, {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "three"}])
    assert system == "A\n\nB"
    assert chat == [{"role": "user", "content": "one\n\ntwo"}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": "three"}]
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(ApiError):
            parse_messages(bad)


def test_parse_sampling_takes_what_it_can_honour() -> None:
    default = SamplingConfig(max_tokens=64, repetition_penalty=1.15, frequency_penalty=0.5)
    got = parse_sampling({"temperature": 0, "max_completion_tokens": 5, "top_p": 0.9}, default)
    assert (got.temperature, got.top_p, got.max_tokens, got.repetition_penalty) == (0.0, 0.9, 5, 1.15)
    assert (got.frequency_penalty, got.presence_penalty) == (0.5, 0.0)  # the server's defaults
    got = parse_sampling({"frequency_penalty": 0, "presence_penalty": 0.3, "stop": None, "min_p": 0.2}, default)
    assert (got.max_tokens, got.frequency_penalty, got.presence_penalty, got.min_p) == (64, 0.0, 0.3, 0.2)
    for bad in ({"frequency_penalty": "x"}, {"stop": ["\n"]}, {"max_tokens": "5"}, {"temperature": "hot"},
                {"tools": [{"type": "function"}]}):
        with pytest.raises(ApiError):
            parse_sampling(bad, default)
