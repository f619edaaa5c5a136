"""How message text is shown in the Chatbot, which renders Markdown with (sanitised) raw HTML.

Stored text stays exactly as written; only what the browser renders is changed:

* a user's message is shown as plain text: HTML and Markdown characters are escaped, so
  `<script>` and `<img src=…>` appear as typed instead of vanishing or making the browser fetch;
* a model's reply keeps its Markdown (lists, emphasis, code), but raw HTML outside code is
  escaped, and images are shown as links, so a reply cannot load a remote URL by itself.
"""

from __future__ import annotations

import re

# Fenced code blocks (``` or ~~~, up to the same fence or the end) and inline code spans: their text
# is shown literally by Markdown already, so it is left untouched.
_CODE = re.compile(r"(^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\2[`~]*[ \t]*$|\Z)|(`+)(?!`).+?(?<!`)\3(?!`))",
                   re.MULTILINE | re.DOTALL)
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|>~<])")


# A web address the Markdown renderer turns into a link by itself (GFM autolinks); backslashes inside it
# would show, so it is kept as typed: a link the user wrote fetches nothing until clicked.
_URL = re.compile(r"(?:https?://|www\.)[^\s<>]*[^\s<>.,;:!?)\]'\"*_~]")


def _escape_markdown(text: str) -> str:
    escaped = text.replace("&", "&amp;")
    # Angle brackets as entities: a link renderer keeps a trailing "\\>" in the link, but not "&gt;".
    entities = {"<": "&lt;", ">": "&gt;"}
    return _MARKDOWN_PUNCTUATION.sub(lambda m: entities.get(m.group(1), "\\" + m.group(1)), escaped)


def as_plain_text(text: str) -> str:
    """`text` escaped so that Markdown and HTML render it exactly as typed."""
    out, pos = [], 0
    for match in _URL.finditer(text):
        out.append(_escape_markdown(text[pos:match.start()]))
        out.append(match.group(0).replace("&", "&amp;"))
        pos = match.end()
    out.append(_escape_markdown(text[pos:]))
    return "".join(out)


def _prose(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;")  # no tag can open; "> quote" stays a quote
    return text.replace("![", "\\![")  # an image would be fetched on display; as a link it needs a click


def as_safe_markdown(text: str) -> str:
    """A model's Markdown with raw HTML and images neutralised outside code."""
    out, pos = [], 0
    for match in _CODE.finditer(text):
        out.append(_prose(text[pos:match.start()]))
        out.append(match.group(0))
        pos = match.end()
    out.append(_prose(text[pos:]))
    return "".join(out)


def for_display(role: str, text: str) -> str:
    """The text of one chat message as the Chatbot should receive it."""
    return as_plain_text(text) if role == "user" else as_safe_markdown(text)


STEP_NAMES = {"export": "reading the feedback", "sft": "learning from demonstrations (SFT)",
              "reward_model": "training the reward model", "judge": "training the judge",
              "ppo": "PPO-ptx", "evaluate": "checking the new version", "register": "registering it",
              "report": "writing its report", "starting": "starting"}


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return ", about 1 min left" if seconds < 90 else f", about {round(seconds / 60)} min left"


def progress_text(training: dict) -> str:
    """A running round's progress in words: its step, done/total of the step's loop, time left in it."""
    step = STEP_NAMES.get(str(training.get("step")), str(training.get("step") or "starting"))
    done, total = training.get("done"), training.get("total")
    counted = (f", {done}/{total} ({done / total:.0%}){_minutes(training.get('eta_s'))}"
               if isinstance(done, int) and isinstance(total, int) and total > 0 else "")
    return f"{step}{counted}"


def banner_text(status: dict) -> str:
    """The line above the tabs: the bare base is live (and why replies may loop), and a training round's
    progress (step, done/total, time left in this step). Empty when there is nothing to say."""
    training = status.get("training")
    progress = progress_text(training) if training else ""
    if status.get("bare_base"):
        if training:
            return (f"⏳ **Training the first aligned version**: {progress}. Until it is ready you are talking to "
                    "the bare base model, which has not learnt to chat yet: its replies often repeat themselves.")
        return ("ℹ️ You are talking to the **bare base model**, which has not learnt to chat yet: its replies often "
                "repeat themselves. Rate, compare and write better replies: that is what the next version learns from.")
    if training:
        return f"🔄 A new version is training: {progress}. You are talking to {status.get('live')}."
    return ""
