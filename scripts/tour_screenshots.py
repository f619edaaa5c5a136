"""Screenshots of each tab of a running app, for the README's tour (Debian's chromium via Playwright).

    ALIGNLOOP_ADMIN_PASSWORD=s3cret alignloop serve --engine hf &   # any running app
    python scripts/tour_screenshots.py --url http://127.0.0.1:7860/ --password s3cret --out docs/tour

Uses the app as a user would (a chat with a thumbs-down and its reasons, a Compare battle and a
vote, a ranking of three replies), so those go into that app's database like any user's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main(
    url: Annotated[str, typer.Option(help="The running app.")] = "http://127.0.0.1:7860/",
    password: Annotated[str, typer.Option(help="Its admin password (for the Dashboard).")] = "",
    out: Annotated[Path, typer.Option(help="Folder for chat.png, compare.png, rank.png, dashboard.png.")] = Path("docs/tour"),
    prompt: Annotated[str, typer.Option(help="What the tour asks.")] = "Give me two tips for sleeping better.",
    timeout_s: Annotated[float, typer.Option(help="Longest wait for a reply.")] = 300.0,
) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise typer.BadParameter("chromium is not installed: `sudo apt-get install chromium` (make test does it).")
    out.mkdir(parents=True, exist_ok=True)
    wait = int(timeout_s * 1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#chat-input textarea", timeout=120_000)

        page.fill("#chat-input textarea", prompt)
        page.click("#chat-send")
        page.wait_for_function("document.body.innerText.includes('generating')", timeout=60_000)
        page.wait_for_function("!document.body.innerText.includes('generating')", timeout=wait)
        page.wait_for_timeout(1500)  # the reply's id reaches the page (database re-sync)
        page.locator('#chatbot button[aria-label="Dislike"]').last.click()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "chat.png"))
        typer.echo(f"wrote {out / 'chat.png'}")

        page.get_by_role("tab", name="Compare").click()
        page.fill("#compare-input textarea", prompt)
        page.click("#compare-go")
        page.wait_for_selector("#vote-A:not([disabled])", timeout=wait)
        page.click("#vote-A")
        page.wait_for_function("document.querySelector('#compare-reveal').innerText.includes('was')", timeout=60_000)
        page.screenshot(path=str(out / "compare.png"))
        typer.echo(f"wrote {out / 'compare.png'}")

        page.get_by_role("tab", name="Rank").click()
        page.fill("#rank-input textarea", prompt)
        page.locator("#rank-k input[type=number]").fill("3")
        page.locator("#rank-k input[type=number]").press("Enter")
        page.click("#rank-go")
        page.wait_for_function("document.querySelector('#rank-reply-2 textarea').value.length > 0", timeout=wait)
        for i, rank in enumerate(["2", "1", "3"]):
            box = page.locator(f"#rank-pos-{i} input")
            box.click()
            box.fill(rank)
            box.press("Enter")
        page.screenshot(path=str(out / "rank.png"))
        typer.echo(f"wrote {out / 'rank.png'}")

        page.get_by_role("tab", name="Dashboard").click()
        page.fill("#admin-password input", password)
        page.click("#admin-unlock")
        page.wait_for_selector("text=Live:", timeout=60_000)
        page.wait_for_timeout(3000)  # the plots render
        page.screenshot(path=str(out / "dashboard.png"), full_page=True)
        typer.echo(f"wrote {out / 'dashboard.png'}")
        browser.close()


if __name__ == "__main__":
    typer.run(main)
