"""Errors that reach the user: each says what is wrong and where."""

from __future__ import annotations


class LLMHyperError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class DataError(LLMHyperError):
    """Bad input data. Names the file, the row (1-based line for text files) and the field."""

    def __init__(
        self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None
    ):
        self.file, self.row, self.field, self.reason = file, row, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class MissingDependency(LLMHyperError, ImportError):
    """An optional part is not installed; the message says which extra brings it."""


class ModelIntegrityError(LLMHyperError):
    """The embedded model file is missing, incomplete or has the wrong hash."""
