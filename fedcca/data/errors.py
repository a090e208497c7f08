"""Errors raised while locating and reading datasets."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing; the message says exactly how to obtain it."""


class DatasetFormatError(ValueError):
    """A dataset file exists but its content does not have the expected format."""
