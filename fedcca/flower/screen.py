"""A robust outlier screen on client weights: drop replies far from the bulk before merging.

Each reply's distance from a center (the coordinate-wise median of the replies, or the
round's global model) is compared with the median distance; a reply farther than
``max_ratio`` times that is dropped with its ratio as the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

NORM_CENTERS: tuple[str, ...] = ("median", "global")


def distance_ratios(states: Sequence[Mapping[str, torch.Tensor]],
                    center: Mapping[str, torch.Tensor] | None = None) -> list[float]:
    """Distance of each state dict from ``center`` (default: their coordinate-wise median) over the median distance.

    Args:
        states: State dicts of one architecture.
        center: The center's state dict, or None for the coordinate-wise median.
    """
    stacked = torch.stack([_flatten(state) for state in states]).numpy()
    middle = np.median(stacked, axis=0) if center is None else _flatten(center).numpy()
    distances = np.linalg.norm(stacked - middle, axis=1)
    typical = float(np.median(distances))
    if typical == 0.0:  # most replies sit exactly on the center: any other one is an outlier
        return [0.0 if d == 0.0 else float("inf") for d in distances]
    return [float(d / typical) for d in distances]


def screen(states: Sequence[Mapping[str, torch.Tensor]], max_ratio: float, center_name: str,
           center: Mapping[str, torch.Tensor] | None = None) -> list[str | None]:
    """Per state dict: None to keep it, else the reason to drop it.

    Args:
        states: The replies' weights.
        max_ratio: Largest allowed distance, in median distances.
        center_name: "median" or "global", for the reason.
        center: The global model's weights when ``center_name`` is "global".
    """
    if not max_ratio > 0:
        raise ValueError(f"max_ratio must be positive, got {max_ratio!r}")
    if not states:
        return []
    ratios = distance_ratios(states, center if center_name == "global" else None)
    return [None if ratio <= max_ratio else
            f"weights {ratio:.3g}x the median distance from the {center_name} (max_norm_ratio={max_ratio})"
            for ratio in ratios]


def _flatten(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.detach().reshape(-1).double().cpu() for value in state_dict.values()
                      if value.is_floating_point()])
