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
    "AlignmentSpec": "fedcca.spec.alignment",
    "AlignmentPoint": "fedcca.spec.alignment",
    "ParamAxis": "fedcca.spec.alignment",
    "Transform": "fedcca.spec.alignment",
    "spec_for": "fedcca.spec.tracing",
    "derive_spec": "fedcca.spec.tracing",
    "UnsupportedModelError": "fedcca.spec.alignment",
    "PairStatistics": "fedcca.statistics",
    "collect_statistics": "fedcca.statistics",
    "MergeConfig": "fedcca.merging.config",
    "MergeSearch": "fedcca.merging.config",
    "Merger": "fedcca.merging.merger",
    "merge": "fedcca.merging.merger",
    "merge_with_result": "fedcca.merging.merger",
    "merge_sequential": "fedcca.merging.merger",
    "InProcessGrid": "fedcca.flower.local_grid",
    "recompute_batchnorm": "fedcca.merging.batchnorm",
    "CCAMerge": "fedcca.flower.strategy",
    "DistillConfig": "fedcca.merging.distillation",
    "resolve_search": "fedcca.merging.config",
    "public_split": "fedcca.data.public",
    "RecordRounds": "fedcca.flower.recording",
    "ScreenReplies": "fedcca.flower.screen",
    "stream_replies": "fedcca.flower.streaming",
    "StreamingGrid": "fedcca.flower.streaming",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedcca' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
