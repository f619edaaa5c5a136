"""Checks on user- and model-supplied text before it reaches the database."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from .errors import InvalidInputError, NotFoundError

MAX_SAMPLING_CHARS = 4_000  # the stored JSON of a reply's sampling settings


def clean_text(value: object, *, field: str, max_chars: int, allow_empty: bool = False) -> str:
    """Return `value` as a valid UTF-8 string, or raise InvalidInputError.

    Accepts `str` or UTF-8 `bytes`. Rejects invalid UTF-8 (including lone surrogates
    in a `str`), NUL characters, empty or whitespace-only text (unless allowed), and
    text longer than `max_chars`.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{field} is not valid UTF-8 (byte {exc.start}); send UTF-8 text.") from None
    if not isinstance(value, str):
        raise InvalidInputError(f"{field} must be text, got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{field} is not valid UTF-8 (unpaired surrogate at character {exc.start}); send UTF-8 text."
        ) from None
    if "\x00" in value:
        raise InvalidInputError(f"{field} contains a NUL character; remove it and try again.")
    if not allow_empty and not value.strip():
        raise InvalidInputError(f"{field} is empty; write some text and try again.")
    if len(value) > max_chars:
        raise InvalidInputError(
            f"{field} is {len(value):,} characters; the limit is {max_chars:,}. Shorten it and try again."
        )
    return value


def clean_tags(tags: object, *, max_tags: int = 16, max_chars: int = 64) -> list[str]:
    """Validate a list of short reason tags (e.g. 'unhelpful', 'made up facts')."""
    if tags is None:
        return []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise InvalidInputError("reasons must be a list of short tags, e.g. ['unhelpful'].")
    if len(tags) > max_tags:
        raise InvalidInputError(f"at most {max_tags} reason tags are allowed, got {len(tags)}.")
    cleaned = [clean_text(t, field="reason tag", max_chars=max_chars) for t in tags]
    return list(dict.fromkeys(cleaned))


def clean_client_id(client_id: object) -> str | None:
    """A client-generated id makes a repeated submission idempotent; it must be short text."""
    if client_id is None:
        return None
    return clean_text(client_id, field="client_id", max_chars=200)


def sampling_json(sampling: object) -> str:
    """A reply's sampling settings as the JSON text stored with it, or InvalidInputError.

    Refuses what is not valid JSON: NaN or infinite numbers (json.dumps would write the
    non-standard `NaN`), values JSON cannot hold, lone surrogates, and oversized settings.
    """
    if not isinstance(sampling, dict):
        raise InvalidInputError(f"sampling must be a dict such as {{'temperature': 0.7}}, not {type(sampling).__name__}.")
    try:
        text = json.dumps(sampling, sort_keys=True, allow_nan=False)
        json.dumps(sampling, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError("sampling holds text with an unpaired surrogate; send UTF-8 text.") from None
    except (TypeError, ValueError, RecursionError) as exc:
        why = "a number that is not finite (NaN or infinity)" if "Out of range float" in str(exc) else \
            f"a value JSON cannot store ({exc})"
        raise InvalidInputError(f"sampling holds {why}; send finite numbers, text, lists or dicts.") from None
    if len(text) > MAX_SAMPLING_CHARS:
        raise InvalidInputError(f"sampling settings are {len(text):,} characters of JSON; the limit is "
                                f"{MAX_SAMPLING_CHARS:,}.")
    return text


def clean_number(value: Any, *, field: str, integer: bool = False) -> float | int | None:
    """A finite, non-negative number (an int when `integer`), or None; else InvalidInputError."""
    if value is None:
        return None
    kind = numbers.Integral if integer else numbers.Real  # numpy scalars included
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < 0:
        what = "a non-negative whole number" if integer else "a finite, non-negative number"
        raise InvalidInputError(f"{field} must be {what} or None, not {value!r}.")
    if integer and value >= 2**63:
        raise InvalidInputError(f"{field} is too large ({value}).")
    return int(value) if integer else float(value)


def clean_id(value: object, *, field: str) -> int:
    """A row id: an integer (not a bool) SQLite can hold; else InvalidInputError (wrong type)
    or NotFoundError (an integer no row can have)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise InvalidInputError(f"{field} must be an integer id, not {shown}.")
    if not 0 < value < 2**63:
        raise NotFoundError(f"no {field} {value}; check the id.")
    return int(value)


def clean_ids(values: object, *, field: str) -> list[int]:
    """A list (or tuple) of row ids, each checked by `clean_id`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise InvalidInputError(f"{field} must be a list of integer ids, not {type(values).__name__}.")
    return [clean_id(v, field=field) for v in values]
