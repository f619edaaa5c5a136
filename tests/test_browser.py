"""A real browser (Debian's chromium, driven by Playwright) uses the app, then we find its rows in SQLite.

Needs `chromium` on PATH (`make test` installs it with apt) and the `playwright` package
(no browser download: we launch Debian's binary).
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.app_server import ADMIN_PASSWORD, count_rows, fetch_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it with apt)")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]



def _wait_for_row(db_path, sql: str, params=(), *, at_least: int = 1, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = count_rows(db_path, sql, params)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.25)


@pytest.fixture(scope="module")
def page(app_server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_server.url)
        page.wait_for_selector("#chat-input textarea", timeout=60_000)
        yield page
        browser.close()


def test_chat_and_thumbs_up(page, app_server, tmp_path):
    db = app_server.db_path
    page.fill("#chat-input textarea", "Hello from the browser")
    page.click("#chat-send")
    sql = ("SELECT COUNT(*) FROM messages r JOIN messages q ON q.id = r.parent_id "
           "WHERE q.content = 'Hello from the browser' AND r.role = 'assistant'")
    assert _wait_for_row(db, sql) == 1
    page.wait_for_selector("#chat-send:not([disabled])")
    page.wait_for_timeout(1000)  # the final update (with the reply id) reaches the page
    (reason,), = fetch_rows(db, "SELECT r.finish_reason FROM messages r JOIN messages q ON q.id = r.parent_id "
                                "WHERE q.content = 'Hello from the browser' AND r.role = 'assistant'")
    assert ("reached the token limit" in page.inner_text("#chat-status")) == (reason == "length")  # a cut-off is marked
    page.locator('#chatbot button[aria-label="Like"]').last.click()
    assert _wait_for_row(db, "SELECT COUNT(*) FROM ratings r JOIN messages m ON m.id = r.message_id "
                             "JOIN messages q ON q.id = m.parent_id "
                             "WHERE q.content = 'Hello from the browser' AND r.value = 1") == 1
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    page.reload()  # the conversation comes back, and so does the 👍 on its reply
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    page.locator('#chatbot button[aria-label="Liked"]').first.wait_for(timeout=30_000)
    assert "Hello from the browser" in page.inner_text("#chatbot")


def test_user_text_shows_as_typed_and_a_refusal_leaves_the_chat_usable(page, app_server, tmp_path):
    """HTML and Markdown in a user's message show as typed (no image fetched, no heading); a refused
    message is a toast, with no "Error" laid over the conversation or the input box, and the text stays
    in the box to be fixed."""
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-new")
    typed = '<img src="http://example.invalid/x.png"> # not a heading *not bold*'
    page.fill("#chat-input textarea", typed)
    page.click("#chat-send")
    bubble = page.locator("#chatbot .message.user, #chatbot [data-testid=user]").last
    bubble.wait_for(timeout=60_000)
    assert page.locator("#chatbot img[src*='example.invalid']").count() == 0
    assert page.locator("#chatbot h1, #chatbot em").count() == 0
    assert typed in bubble.inner_text()
    page.wait_for_selector("#chat-send:not([disabled])")
    page.wait_for_timeout(1000)
    page.fill("#chat-input textarea", "x" * 4_100)
    page.click("#chat-send")
    page.get_by_text("the limit is 4,000").first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    assert not page.locator("#chatbot .error").first.is_visible()
    assert not page.locator("#chat-input .error").first.is_visible()
    assert page.input_value("#chat-input textarea") == "x" * 4_100
    assert typed in page.locator("#chatbot").inner_text()  # the conversation is still shown
    page.screenshot(path=str(tmp_path / "refused.png"), full_page=True)


def test_compare_vote(page, app_server):
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare-input textarea", "Which fruit is best?")
    page.click("#compare-go")
    page.wait_for_selector("#vote-tie:not([disabled])", timeout=90_000)
    page.click("#vote-tie")
    page.wait_for_function("document.querySelector('#compare-reveal').innerText.includes('was')", timeout=30_000)
    assert "You voted Tie" in page.inner_text("#compare-reveal")  # the page says which side you chose
    assert "primary" in page.get_attribute("#vote-tie", "class")
    page.click("#compare-next")  # the next battle starts clean
    page.wait_for_function("document.querySelector('#compare-reveal').innerText.trim() === ''", timeout=30_000)
    assert page.input_value("#compare-input textarea") == "" and not page.locator("#compare-next").is_visible()
    assert _wait_for_row(app_server.db_path,
                         "SELECT COUNT(*) FROM comparisons c JOIN messages q ON q.id = c.user_message_id "
                         "WHERE q.content = 'Which fruit is best?' AND c.choice = 'tie'") == 1


def test_rank_three_replies(page, app_server):
    page.get_by_role("tab", name="Rank").click()
    page.fill("#rank-input textarea", "Rank these jokes")
    page.locator("#rank-k input[type=number]").fill("3")
    page.locator("#rank-k input[type=number]").press("Enter")
    page.click("#rank-go")
    # The three replies are stored, then shown (a tiny random model may reply with nothing, so the
    # test waits for the third row to be visible, not for its text).
    replies = ("SELECT COUNT(*) FROM messages r JOIN messages q ON q.id = r.parent_id "
               "WHERE q.content = 'Rank these jokes' AND r.role = 'assistant'")
    assert _wait_for_row(app_server.db_path, replies, at_least=3, timeout=90) == 3
    page.wait_for_selector("#rank-reply-2 textarea", state="visible", timeout=60_000)
    page.wait_for_timeout(500)
    for i, rank in enumerate(["2", "3", "1"]):
        box = page.locator(f"#rank-pos-{i} input")
        box.click()
        box.fill(rank)  # the dropdown filters its options; Enter picks the match
        box.press("Enter")
    page.click("#rank-submit")
    page.wait_for_function("document.querySelector('#rank-result').innerText.includes('saved')", timeout=30_000)
    sql = ("SELECT COUNT(*) FROM rankings k JOIN messages q ON q.id = k.user_message_id "
           "WHERE q.content = 'Rank these jokes' AND k.k = 3")
    assert _wait_for_row(app_server.db_path, sql) == 1


def test_dashboard_opens_with_the_admin_password(page):
    page.get_by_role("tab", name="Dashboard").click()
    page.fill("#admin-password input", ADMIN_PASSWORD)
    page.click("#admin-unlock")
    page.wait_for_selector("text=Live:", timeout=30_000)


def _idle(page) -> None:
    """Wait until no reply streams: Send is back and Stop hidden."""
    page.wait_for_selector("#chat-send", state="visible", timeout=90_000)
    page.wait_for_selector("#chat-stop", state="hidden", timeout=30_000)
    page.wait_for_timeout(500)


def _ask_in_a_new_chat(page, text: str) -> None:
    """Chat tab, + New chat, send `text`, wait for the reply to finish."""
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-new")
    page.fill("#chat-input textarea", text)
    page.click("#chat-send")
    _idle(page)


def _question(db, text: str) -> tuple[int, int, int | None]:
    (row,) = fetch_rows(db, "SELECT id, conversation_id, parent_id FROM messages WHERE role = 'user' AND content = ?",
                        [text])
    return row


def test_regenerated_replies_can_be_browsed_and_a_sent_message_edited(page, app_server):
    """Regenerate, then ‹ / › move between the replies of that turn (as stored); editing the sent message
    sends it again as a new branch of the same conversation, and the old branch stays stored."""
    db = app_server.db_path
    _ask_in_a_new_chat(page, "Tell me about owls")
    assert not page.locator("#reply-nav").is_visible()  # one reply: nothing to move between
    page.click("#chat-regenerate")
    question, conversation, _ = _question(db, "Tell me about owls")
    assert _wait_for_row(db, "SELECT COUNT(*) FROM messages WHERE parent_id = ?", [question], at_least=2) == 2
    _idle(page)
    page.wait_for_function("document.querySelector('#reply-pos').innerText.includes('2 / 2')", timeout=30_000)
    page.click("#reply-prev")
    page.wait_for_function("document.querySelector('#reply-pos').innerText.includes('1 / 2')", timeout=30_000)
    page.click("#reply-next")
    page.wait_for_function("document.querySelector('#reply-pos').innerText.includes('2 / 2')", timeout=30_000)

    page.locator("#chatbot .user-row").last.hover()
    page.locator('#chatbot button[aria-label="Edit"]').first.click()
    page.locator("#chatbot textarea.edit-textarea").fill("Tell me about cats")
    page.locator('#chatbot button[aria-label="Submit"]').first.click()
    assert _wait_for_row(db, "SELECT COUNT(*) FROM messages m JOIN messages r ON r.parent_id = m.id "
                             "WHERE m.content = 'Tell me about cats' AND r.role = 'assistant'") == 1
    _idle(page)
    edited, edited_conversation, parent = _question(db, "Tell me about cats")
    assert (edited_conversation, parent) == (conversation, None)  # a new branch from the same point (the root)
    shown = page.inner_text("#chatbot")
    assert "Tell me about cats" in shown and "Tell me about owls" not in shown
    assert count_rows(db, "SELECT COUNT(*) FROM messages WHERE parent_id = ?", [question]) == 2  # the old branch stays


def test_send_becomes_stop_while_a_reply_streams(page, app_server):
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-new")
    page.get_by_text("Settings: system prompt and sampling").click()
    tokens = page.get_by_label("number input for Max new tokens")
    tokens.fill("1024")
    tokens.press("Enter")
    temperature = page.get_by_label("number input for Temperature")
    temperature.fill("0")  # greedy: the tiny random model loops and never ends its reply early
    temperature.press("Enter")
    try:
        page.fill("#chat-input textarea", "Write a very long story")
        page.click("#chat-send")
        page.wait_for_selector("#chat-stop", state="visible", timeout=10_000)
        assert not page.locator("#chat-send").is_visible()
        page.wait_for_function("document.querySelector('#chat-status').innerText.includes('generating')",
                               timeout=30_000)  # the reply streams
        page.click("#chat-stop")
        page.wait_for_function("document.querySelector('#chat-status').innerText.includes('Stopped')", timeout=30_000)
        _idle(page)
        assert page.locator("#chat-send").is_visible() and not page.locator("#chat-stop").is_visible()
    finally:
        tokens.fill("16")
        tokens.press("Enter")
        temperature.fill("0.8")
        temperature.press("Enter")
        page.get_by_text("Settings: system prompt and sampling").click()


def test_a_conversation_is_renamed_exported_and_deleted(page, app_server):
    db = app_server.db_path
    _ask_in_a_new_chat(page, "A question to keep")
    _, conversation, _ = _question(db, "A question to keep")
    page.get_by_text("This conversation").click()
    page.fill("#conversation-title input", "Kept question")
    page.click("#conversation-rename")
    assert _wait_for_row(db, "SELECT COUNT(*) FROM conversations WHERE id = ? AND title = 'Kept question'",
                         [conversation]) == 1
    page.wait_for_function("document.querySelector('#chat-history input').value.startsWith('Kept question · ')",
                           timeout=30_000)  # the list shows the title and the date

    page.click("#conversation-export")
    link = page.locator("#conversation-file a").first
    link.wait_for(timeout=30_000)
    exported = page.request.get(link.get_attribute("href")).json()
    assert exported["title"] == "Kept question" and exported["id"] == conversation
    assert [m["content"] for m in exported["messages"]][0] == "A question to keep"

    page.click("#conversation-delete")
    assert _wait_for_row(db, "SELECT COUNT(*) FROM conversations WHERE id = ? AND deleted_at IS NOT NULL",
                         [conversation]) == 1
    page.wait_for_timeout(500)
    assert "A question to keep" not in page.inner_text("#chatbot")
    page.locator("#chat-history input").click()
    page.wait_for_timeout(1000)
    assert "Kept question" not in page.inner_text("body")
    page.keyboard.press("Escape")
