"""Errors of the data layer: every bad record names its file, its id and what is wrong.

`RecordError` (docs/CONTRACTS.md §3) is the base of every per-record problem; each subclass is one kind
of problem so callers can filter (e.g. `MultimodalDataset.validate` returns a list of them).
`DataFileError` is for problems of a whole data file (unreadable JSON/YAML, bad mixture entry).
"""

from __future__ import annotations


class RecordError(ValueError):
    """A record that cannot be used; `path`, `record_id` and `reason` say which and why."""

    def __init__(self, path: str, record_id: str, reason: str) -> None:
        self.path = str(path)
        self.record_id = str(record_id)
        self.reason = reason
        super().__init__(f"{self.path}: record {self.record_id!r}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.path, self.record_id, self.reason))


class MalformedRecordError(RecordError):
    """The record or one of its fields has the wrong JSON type (e.g. `conversations` not a list)."""


class MissingKeyError(RecordError):
    """A required key (`conversations`, `prompt`, `chosen`, `rejected`, `from`, `value`) is absent."""


class MissingImageError(RecordError):
    """An image file named by the record does not exist."""


class UnreadableImageError(RecordError):
    """An image file exists but PIL cannot decode it."""


class EmptyResponseError(RecordError):
    """An assistant reply (`gpt` turn, `chosen` or `rejected`) is empty or whitespace only."""


class ImageTokenMismatchError(RecordError):
    """The number of `<image>` placeholders in the text differs from the number of images."""


class SequenceTooLongError(RecordError):
    """The tokenised sequence, after expanding each `<image>` to its visual tokens, exceeds the limit."""


class InvalidRoleError(RecordError):
    """Conversation turns do not alternate human/gpt starting with human and ending with gpt."""


class TemplateMismatchError(RecordError):
    """The record does not fit the chat template (the `plain` template takes exactly one exchange)."""


class DataFileError(ValueError):
    """A data file (JSON, JSONL or YAML mixture) that cannot be read or has an invalid entry."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.path, self.reason))
