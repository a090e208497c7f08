"""Choosing the torch device at run time."""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` picks CUDA when present, else CPU.

    Args:
        device: An explicit device (``"cpu"``, ``"cuda:1"``, a ``torch.device``) or ``None``.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
