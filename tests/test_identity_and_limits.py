"""Identities the server signs, the anonymous-id quota, request limits and how text is rendered:
hand-made cases, no server."""

from __future__ import annotations

import os
import stat

import pytest

from chat_app.identity import AnonymousIdQuota, IdentitySigner, load_or_create_key, secret_key_path
from chat_app.limits import LimitConfig, RateLimiter, RequestLimits, UserFacingError
from chat_app.ui.rendering import as_plain_text, as_safe_markdown


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- identities ------------------------------------------------------------------------------
def test_a_token_names_its_identity_and_cannot_be_forged_or_moved() -> None:
    signer = IdentitySigner(b"k" * 32)
    alice = signer.new_anonymous_id()
    token = signer.token(alice)
    assert signer.verify(token) == alice
    bob = signer.new_anonymous_id()
    assert signer.verify(f"{bob}.{token.rsplit('.', 1)[1]}") is None  # alice's signature on bob's id
    assert signer.verify(f"{alice}.AAAA") is None
    assert signer.verify(alice) is None  # the bare id (what the old app kept) is no token
    assert signer.verify({"user_id": alice}) is None and signer.verify(None) is None
    # Only anonymous ids are ever signed: a token cannot claim a login name or the importer.
    assert signer.verify(IdentitySigner(b"k" * 32).token("importer")) is None
    assert IdentitySigner(b"other-key" * 4).verify(token) is None


def test_the_key_survives_a_restart_and_is_private(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ALIGNLOOP_SECRET_KEY", raising=False)
    path = secret_key_path(tmp_path / "feedback.db")
    first = load_or_create_key(path)
    assert load_or_create_key(path) == first and len(first) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv("ALIGNLOOP_SECRET_KEY", "from-the-environment-0123456789")
    assert load_or_create_key(path) == b"from-the-environment-0123456789"


def test_new_anonymous_ids_are_limited_per_address_and_the_map_shrinks() -> None:
    clock = Clock()
    quota = AnonymousIdQuota(3, clock=clock)
    for _ in range(3):
        quota.take("10.0.0.1")
    with pytest.raises(UserFacingError, match="Too many new sessions"):
        quota.take("10.0.0.1")
    quota.take("10.0.0.2")  # another address has its own budget
    clock.now += 3601
    quota.take("10.0.0.1")
    assert list(quota._minted) == ["10.0.0.1"]  # 10.0.0.2 was idle for an hour: forgotten


# -- limits ----------------------------------------------------------------------------------
def test_a_request_is_charged_its_cost_to_identity_and_address() -> None:
    clock = Clock()
    limits = RequestLimits(LimitConfig(generations_per_user=5, generations_per_address=8), clock=clock)
    limits.generation("alice", "1.2.3.4", cost=4)  # a Rank of 4 replies
    with pytest.raises(UserFacingError, match="for you is reached"):
        limits.generation("alice", "1.2.3.4", cost=2)  # a Compare battle: 6 > 5
    limits.generation("bob", "1.2.3.4", cost=2)
    with pytest.raises(UserFacingError, match="for your address is reached"):
        limits.generation("carol", "1.2.3.4", cost=3)  # a fresh identity, but the address has 2 left
    limits.generation("carol", "1.2.3.4", cost=2)
    with pytest.raises(UserFacingError, match="costs 9"):
        limits.generation("dave", "5.6.7.8", cost=9)
    clock.now += 61
    limits.generation("alice", "1.2.3.4", cost=5)


def test_a_refused_request_charges_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.check({"user:a": 2, "address:x": 10})
    limiter.check({"user:a": 2, "address:x": 10})
    for _ in range(5):
        with pytest.raises(UserFacingError):
            limiter.check({"user:a": 2, "address:x": 10})
    limiter.check({"user:b": 2, "address:x": 4})  # x holds 2 hits, not 7: the refusals were not counted
    limiter.check({"user:b": 2, "address:x": 4})
    with pytest.raises(UserFacingError):
        limiter.check({"user:c": 2, "address:x": 4})


def test_feedback_writes_are_limited_and_idle_keys_forgotten() -> None:
    clock = Clock()
    limits = RequestLimits(LimitConfig(feedback_per_user=3, feedback_per_address=100), clock=clock)
    for _ in range(3):
        limits.feedback("voter", "9.9.9.9")
    with pytest.raises(UserFacingError, match="3 feedback actions a minute"):
        limits.feedback("voter", "9.9.9.9")
    for i in range(50):
        limits.feedback(f"user-{i}", f"10.0.0.{i}")
    assert limits.tracked_keys() == 102
    clock.now += 75
    limits.feedback("late", None)
    assert limits.tracked_keys() == 1


def test_no_limit_when_the_budget_is_zero() -> None:
    limits = RequestLimits(LimitConfig(0, 0, 0, 0))
    for _ in range(1000):
        limits.generation("a", "b", cost=9)
        limits.feedback("a", "b")
    assert limits.tracked_keys() == 0


# -- rendering -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["<script>alert(1)</script>", '<img src="http://evil.example/x.png">',
                                  "# Gates: passed", "![x](http://evil.example/x.png)", "a & b < c",
                                  "*not bold* `not code`", "1. not a list"])
def test_user_text_renders_as_typed(text: str) -> None:
    import markdown_it

    html = markdown_it.MarkdownIt("commonmark").render(as_plain_text(text))
    assert "<script" not in html and "<img" not in html and "<h1" not in html and "<em" not in html
    assert "<code" not in html and "<ol" not in html
    assert html.startswith("<p>") and html.count("<p>") == 1


def test_model_markdown_keeps_formatting_but_no_raw_html_or_images() -> None:
    import markdown_it

    md = markdown_it.MarkdownIt("commonmark")
    reply = ("**Tip:** use a list:\n\n- one\n- two\n\n<img src=x onerror=alert(1)> ![t](http://evil.example/t.png)\n\n"
             "```html\n<b>kept as code</b>\n```\n\nand `<i>` inline")
    html = md.render(as_safe_markdown(reply))
    assert "<strong>Tip:</strong>" in html and "<li>one</li>" in html
    assert "<img" not in html and "onerror=alert(1)" in html  # shown as text, not as a tag
    assert "&lt;b&gt;kept as code&lt;/b&gt;" in html  # code is shown literally, not double-escaped
    assert "<code>&lt;i&gt;</code>" in html
