"""Errors of the Flower layer's aggregation."""

from __future__ import annotations


class SkipRound(Exception):
    """The round cannot produce a model; the message is the reason."""
