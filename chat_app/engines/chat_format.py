"""ChatFormat: how a conversation becomes prompt tokens, and which tokens end a reply.

Both engines render prompts here, with the base model's own tokenizer and chat template, so
the same conversation gives the same prompt tokens (and the same token counts) on either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from training.base_models import END_OF_TURN, START_OF_TURN

from .base import EngineError, Messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



class ChatFormat:
    """Prompt rendering and reply stops for one base model.

    Args:
        tokenizer: the base model's tokenizer; it must have a chat template.
        stop_token_ids: tokens that end a reply (EOS, end of turn).
        max_model_len: prompt + reply tokens allowed per request.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: list[int], max_model_len: int) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(
                "The base model's tokenizer has no chat template. Prepare the model first "
                "(`alignloop models prepare PATH`), which adds Gemma's turn template."
            )
        if not stop_token_ids:
            raise EngineError("The base model has no EOS token, so replies could never end; prepare it first.")
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.max_model_len = max_model_len

    @classmethod
    def from_pretrained(cls, model_path: str | Path, max_model_len: int) -> ChatFormat:
        """Load the tokenizer of a prepared model folder and read its stop tokens."""
        from transformers import AutoTokenizer

        folder = Path(model_path)
        if not (folder / "config.json").is_file():
            raise EngineError(
                f"{folder} is not a model folder (no config.json). Prepare one first: "
                "`alignloop models prepare NAME_OR_PATH`."
            )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(tokenizer, read_stop_token_ids(folder, tokenizer), max_model_len)

    def render(self, messages: Messages) -> list[int]:
        """The prompt tokens for `messages`, ending with the opening of the model's turn.

        Raises EngineError when the conversation cannot be rendered or does not fit.
        """
        if not messages:
            raise EngineError("The conversation is empty; send at least one user message.")
        if messages[-1].get("role") != "user":
            raise EngineError(
                f"The conversation ends with a {messages[-1].get('role')!r} message; the model answers "
                "only after a user message."
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja's TemplateError, raise_exception() in the template, bad content
            raise EngineError(f"The chat template could not render this conversation: {exc}") from exc
        return self.check_prompt(list(ids))

    def fit_messages(self, messages: Messages, max_tokens: int) -> tuple[Messages, int]:
        """The newest turns of `messages` that leave room for a reply, and how many older ones were left out.

        Room for a reply is `max_tokens`, at most half of max_model_len. The rule is training's
        (`training.chat_data.fit_prompt`): whole oldest turns go first, the system turn stays, and
        the kept turns start with a user turn. A newest message too long on its own is refused.
        """
        from training.chat_data import fit_prompt

        room = max(1, min(max_tokens, self.max_model_len // 2))
        fitted = fit_prompt(self.tokenizer, messages, self.max_model_len - room)
        if fitted.tokens_cut:
            raise EngineError(
                f"Your message alone is longer than the model's context ({self.max_model_len} tokens with the "
                "reply). Shorten it, or split it over several messages.")
        if not fitted.turns_dropped:
            return messages, 0
        system = messages[:1] if messages and messages[0].get("role") == "system" else []
        return system + messages[len(system) + fitted.turns_dropped:], fitted.turns_dropped

    def check_prompt(self, ids: list[int]) -> list[int]:
        """``ids`` if a reply can follow them within max_model_len; else an EngineError that says what to do."""
        if not ids:
            raise EngineError("The prompt has no tokens; render a conversation first.")
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"The conversation is {len(ids)} tokens, but the engine allows {self.max_model_len} "
                "(prompt + reply). Start a new conversation, or raise EngineConfig.max_model_len."
            )
        return ids

    def reply_budget(self, prompt_tokens: int, max_tokens: int) -> int:
        """`max_tokens`, cut so that prompt + reply fit in max_model_len."""
        return min(max_tokens, self.max_model_len - prompt_tokens)


def read_stop_token_ids(model_path: Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from generation_config.json, the tokenizer's EOS, and `<end_of_turn>` and `<start_of_turn>` when
    each is one token (a small model sometimes opens the next turn without closing its own: the served
    reply would show "model" and go on as the next speaker)."""
    ids: list[int] = []
    config_file = model_path / "generation_config.json"
    if config_file.is_file():
        eos = json.loads(config_file.read_text()).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)
    start_of_turn = tokenizer.convert_tokens_to_ids(START_OF_TURN)
    if isinstance(start_of_turn, int) and start_of_turn != tokenizer.unk_token_id:
        ids.append(start_of_turn)
    return list(dict.fromkeys(ids))
