"""fedcca: CCA Merge for Flower.

The core library (models, alignment structure, statistics, transforms, merging, data) needs
only torch, numpy and scipy. ``CCAMerge`` (the Flower strategy) is imported lazily so that
``import fedcca`` works without touching Flower.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "build_model": "fedcca.models",
    "MODEL_NAMES": "fedcca.models",
    "AlignmentSpec": "fedcca.alignment",
    "AlignmentPoint": "fedcca.alignment",
    "ParamAxis": "fedcca.alignment",
    "Transform": "fedcca.alignment",
    "spec_for": "fedcca.alignment",
    "derive_spec": "fedcca.tracing",
    "UnsupportedModelError": "fedcca.alignment",
    "PairStatistics": "fedcca.statistics",
    "collect_statistics": "fedcca.statistics",
    "MergeConfig": "fedcca.config",
    "MergeSearch": "fedcca.config",
    "Merger": "fedcca.merging",
    "merge": "fedcca.merging",
    "merge_with_result": "fedcca.merging",
    "merge_sequential": "fedcca.merging",
    "InProcessGrid": "fedcca.local_grid",
    "recompute_batchnorm": "fedcca.batchnorm",
    "CCAMerge": "fedcca.strategy",
    "DistillConfig": "fedcca.distillation",
    "resolve_search": "fedcca.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedcca' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
