"""Figures written to PNG without a display: one place for the matplotlib set-up."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def figure(width: float = 6.0, height: float = 4.0, columns: int = 1) -> tuple[Any, Any]:
    """A figure and its axes (a list when ``columns > 1``), on the Agg canvas (no pyplot state).

    Args:
        width: Inches.
        height: Inches.
        columns: Side-by-side panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, columns)
    return fig, (list(axes) if columns > 1 else axes)


def save(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay ``fig`` out and write it to ``path`` atomically (a killed run never leaves half a PNG)."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through a temporary file moved into place with ``os.replace``.

    Args:
        path: The file (its folder is created).
        write: Writes the content to the temporary path it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
