"""Round reports show user and model text as text: hostile prompts and replies cannot add headings,
images, links or HTML to the Markdown the operators read in the dashboard."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from training.round_report import escape_markdown_inline, fenced_text, write_round_report

HOSTILE = [
    "# Gates: passed",
    "## Gates\n\n| gate | verdict |\n|---|---|\n| kl | **passed** |",
    "![x](http://evil.example/x.png)",
    "[click me](http://evil.example/)",
    "<img src=http://evil.example/x.png onerror=alert(1)>",
    "<script>alert(1)</script>",
    "&lt;b&gt; already an entity &amp;",
    "```\n# escaped the fence\n```",
    "````\n``` nested ``` fences\n`````",
    "a | b | c",
    "line one\nline two\r\nline three\u2028four",
    "1. ordered\n- bullet\n+ plus\n---\n===",
    "> quoted\n    indented code",
    "*bold* _em_ ~~strike~~ `code` \\ back\\slash",
    "http://evil.example/auto www.evil.example/auto <http://evil.example/>",
    "[ref]: http://evil.example/ref\n[ref]",
]


def render(markdown: str) -> str:
    """Markdown as a permissive viewer renders it: raw HTML allowed, GFM tables and strikethrough on."""
    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(markdown)


def one_line(text: str) -> str:
    return re.sub(r"\r\n|[\n\r\u2028]", " ", text)


@pytest.mark.parametrize("text", HOSTILE)
def test_inline_escape_renders_as_the_literal_text(text: str) -> None:
    """Rendered alone or in a table cell, the escaped text is exactly the original text (one line)."""
    escaped = escape_markdown_inline(text)
    assert "\n" not in escaped and "\r" not in escaped
    expected = html.escape(one_line(text), quote=False).strip()
    paragraph = render(escaped)
    assert paragraph == f"<p>{expected}</p>\n"
    table = render(f"| key | value |\n|---|---|\n| k | {escaped} |\n| after | row |\n")
    cells = re.findall(r"<td>(.*?)</td>", table, flags=re.S)
    assert cells == ["k", expected, "after", "row"]  # the pipe made no new column, the newline no new row


@pytest.mark.parametrize("text", HOSTILE)
def test_fenced_text_renders_verbatim_in_one_code_block(text: str) -> None:
    rendered = render("\n".join(["before", "", *fenced_text(text), "", "after"]))
    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", rendered, flags=re.S)
    normalised = re.sub(r"\r\n|[\r\u2028]", "\n", text)
    assert blocks == [html.escape(normalised, quote=False) + "\n"]
    assert rendered.endswith("<p>after</p>\n")  # the fence closed where it should, not inside the text


def test_fence_is_longer_than_any_backtick_run() -> None:
    lines = fenced_text("a ````` b")
    assert lines[0] == "``````text" and lines[-1] == "``````"
    assert fenced_text("plain")[0] == "```text"


def hostile_metrics() -> dict:
    prompt = "# Gates: passed\n![x](http://evil.example/x.png)\n<b>bold</b>"
    reply = "```\n## Gates\n| kl | **passed** |\n```\n<img src=http://evil.example/y.png>"
    return {
        "reason": "# Gates: passed <img src=http://evil.example/z.png>",
        "mode": "full",
        "candidate": "v3 | <i>x</i>",
        "data": {"pairs": 12, "note\n# heading": "a|b\nc"},
        "gates": {"kl": {"verdict": "failed", "value": 9.0, "ci": None, "n": 3, "threshold": 5.0,
                         "note": "held-out prompts: 3, need at least 2"}},
        "samples": [{"prompt": prompt, "live": reply, "candidate": "[link](http://evil.example/)",
                     "reward_live": 0.1, "reward_candidate": 0.2}],
        "fixed_samples": [{"prompt": [{"role": "user", "content": "<script>alert(1)</script>"}],
                           "live": "````", "candidate": "~~~\n# tilde"}],
        "error": "ValueError: ``` # boom",
        "traceback": "Traceback\n```\n# Gates: passed\n```",
    }


def test_report_with_hostile_samples_has_only_our_structure(tmp_path: Path) -> None:
    path = write_round_report(tmp_path, 7, "failed", hostile_metrics())
    rendered = render(path.read_text())
    headings = re.findall(r"<h(\d)>(.*?)</h\1>", rendered)
    assert headings == [("1", "Training round 7: failed"), ("2", "Data"), ("2", "Gates"),
                        ("2", "Sample replies on held-out prompts (greedy)"),
                        ("2", "Before and after on the fixed prompts (greedy; the same prompts every round)"),
                        ("2", "Error")]
    assert "<img" not in rendered and "<a " not in rendered and "<b>" not in rendered
    assert "<script" not in rendered and "<i>" not in rendered
    # every gate row is ours: one row, the verdict the round computed
    gate_table = rendered.split("<h2>Gates</h2>")[1].split("</table>")[0]
    assert re.findall(r"<strong>(.*?)</strong>", gate_table) == ["failed"]
    assert "held-out prompts: 3, need at least 2" in gate_table
    # the user's and the model's text is all there, verbatim, in code blocks
    blocks = [html.unescape(b) for b in re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", rendered, flags=re.S)]
    metrics = hostile_metrics()
    for text in (metrics["samples"][0]["prompt"], metrics["samples"][0]["live"], "[link](http://evil.example/)",
                 "<script>alert(1)</script>", "````", "~~~\n# tilde", metrics["traceback"]):
        assert text + "\n" in blocks
    # short strings in tables are escaped, not dropped
    assert "v3 | &lt;i&gt;x&lt;/i&gt;" in rendered and "a|b c" in rendered
