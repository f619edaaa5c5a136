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
    """Another writer held the database longer than `StoreConfig.lock_timeout_s`; retry shortly."""
