"""Errors raised by galaxy.data."""


class DataError(ValueError):
    """A data or tokenizer file cannot be used; the message names the file (and line)."""
