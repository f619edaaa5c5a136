"""Errors raised by the feedback store. Each message says what went wrong and what to do."""

from __future__ import annotations


class FeedbackError(ValueError):
    """Base class: the request was refused and nothing was written."""


class InvalidInputError(FeedbackError):
    """The submitted data is malformed (empty, oversized, wrong shape)."""


class NotFoundError(FeedbackError):
    """A referenced row (message, conversation, model version, ...) does not exist."""


class AccessDeniedError(FeedbackError):
    """The user may not act on this row (e.g. another user's conversation)."""


class RegistryError(FeedbackError):
    """A model-registry operation is not possible in the current state."""


class SchemaVersionError(FeedbackError):
    """The database was written by a newer alignloop than this one."""


class StoreBusyError(FeedbackError):
    """Another writer held the database longer than `StoreConfig.lock_timeout_s`; retry shortly.

    ``str()`` is what a user may read; ``detail`` is for the operator's log: how long it waited, on
    which lock file, and who held the lock (process, command, thread, for how long) when it gave up.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def for_operator(exc: BaseException) -> str:
    """An error as an operator should read it (a CLI, a server log): its message, then its ``detail``
    (or its cause's), e.g. who held the write lock."""
    detail = getattr(exc, "detail", "") or getattr(exc.__cause__, "detail", "")
    return f"{exc} ({detail})" if detail else str(exc)
