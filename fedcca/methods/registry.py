"""The registry of merge methods: how each one turns a model into reference coordinates.

A merge method is one module of :mod:`fedcca.methods` that builds an :class:`Aligner` and
passes it to :func:`register`: its name, the statistics and data it needs, its own
parameters (:class:`Parameter`) and how it computes the transforms of one model
(:class:`AlignmentJob`). Everything else (:class:`~fedcca.merging.config.MergeConfig`, the
merge pipeline, the Flower strategy, the CLI and the run config) looks methods and their
parameters up here, so adding a method touches its own module only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedcca.spec.alignment import AlignmentSpec, Transform
from fedcca.statistics import PairStatistics


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method, given as a keyword of ``MergeConfig`` / ``merge``.

    Args:
        name: The keyword (e.g. ``"ridge"``).
        default: Its value when not given.
        check: ``value -> validated value``; raises ValueError naming the problem.
        help: One line for documentation and the CLI.
        kind: The type a command-line or run-config string is read as.
        label: Short name in candidate labels (``"g"`` gives ``cca g=0.5``); None: never shown.
        always_label: Show it in labels even at its default.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    kind: type = float
    label: str | None = None
    always_label: bool = False


@dataclass(frozen=True)
class AlignmentJob:
    """Everything an aligner may read to align one model.

    Args:
        spec: The points to align (a sub-spec of the model's).
        options: The method's parameters, every declared one present (defaults filled in).
        statistics: Per-point statistics of the model against the reference (None for
            data-free aligners).
        state: The model's weights.
        reference_state: The reference's weights.
        name: How messages call the model.
        cache: What stays valid for every model aligned to this reference (e.g. its
            whitening), one entry per method, kept by the caller across models.
    """

    spec: AlignmentSpec
    options: Mapping[str, Any]
    statistics: Mapping[str, PairStatistics] | None
    state: Mapping[str, torch.Tensor]
    reference_state: Mapping[str, torch.Tensor]
    name: str = "model"
    cache: dict[str, Any] | None = None

    def pair(self, point: str) -> PairStatistics:
        """The statistics of ``point``; ValueError naming the model when they are missing."""
        if self.statistics is None or point not in self.statistics:
            raise ValueError(f"{self.name}: no statistics for point '{point}'")
        return self.statistics[point]


@dataclass(frozen=True)
class Aligner:
    """One merge method.

    Args:
        name: The method's name (``MergeConfig.method``).
        needs_statistics: Whether it reads activation statistics against the reference.
        transforms: ``job -> {point: Transform}`` for every point of ``job.spec``.
        description: One line for documentation and tables.
        parameters: Its own parameters (keywords of ``MergeConfig``).
        joint: It aligns all models together (:mod:`fedcca.methods.zipit`) rather than each to
            the reference: only ``fedcca.merge`` can use it, with every model at hand.
        shrinkable: Its transforms stay invertible when shrunk towards the identity,
            ``I + a (T - I)`` for ``0 < a < 1`` (dense CCA transforms do; a permutation with a
            swap does not: ``(I + P) / 2`` has two equal rows).
        check_options: ``options -> None``, raising ValueError for a combination of valid
            values that is not (e.g. an infinite ridge outside "trace" mode).
        permutation: Its transforms are permutations and it honours
            :attr:`~fedcca.spec.alignment.AlignmentPoint.groups` (permutations within groups, no
            rescaling): it may align points normalised by a GroupNorm/LayerNorm; other methods
            leave them averaged as they are.
    """

    name: str
    needs_statistics: bool
    transforms: Callable[[AlignmentJob], dict[str, Transform]]
    description: str
    parameters: tuple[Parameter, ...] = ()
    joint: bool = False
    shrinkable: bool = True
    check_options: Callable[[Mapping[str, Any]], None] | None = None
    permutation: bool = False

    def options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter of this method: the value in ``given`` or its default."""
        return {p.name: given.get(p.name, p.default) for p in self.parameters}

    def label(self, given: Mapping[str, Any]) -> str:
        """The method's part of a candidate label, e.g. ``cca g=0.5``."""
        parts = [self.name]
        for p in self.parameters:
            if p.label is not None and (p.always_label or p.name in given):
                parts.append(f"{p.label}={given.get(p.name, p.default):g}")
        return " ".join(parts)


ALIGNERS: dict[str, Aligner] = {}
"""Merge method name -> :class:`Aligner`, filled by the modules of :mod:`fedcca.methods`."""


def register(aligner: Aligner) -> Aligner:
    """Add a merge method to :data:`ALIGNERS` (returns it, for module-level use).

    Raises:
        ValueError: The name is taken, or a parameter name is declared by another method
            with a different :class:`Parameter` (a keyword must mean one thing).
    """
    if aligner.name in ALIGNERS:
        raise ValueError(f"merge method {aligner.name!r} is already registered")
    declared = parameters()
    for p in aligner.parameters:
        if p.name in declared and declared[p.name] != p:
            raise ValueError(f"merge method {aligner.name!r}: parameter {p.name!r} is declared differently by "
                             "another method; reuse that method's Parameter")
    ALIGNERS[aligner.name] = aligner
    return aligner


def unregister(name: str) -> None:
    """Remove a merge method (for tests and plug-ins); KeyError when it is not registered."""
    del ALIGNERS[name]


def aligner(name: str) -> Aligner:
    """The registered method ``name``; ValueError listing the methods when there is none."""
    if name not in ALIGNERS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(ALIGNERS)}")
    return ALIGNERS[name]


def parameters() -> dict[str, Parameter]:
    """Every parameter name declared by a registered method -> its :class:`Parameter`."""
    return {p.name: p for a in ALIGNERS.values() for p in a.parameters}


def number(name: str, low: float, high: float = math.inf, *, optional: bool = False) -> Callable[[Any], Any]:
    """A :attr:`Parameter.check` accepting a real number in ``[low, high]`` (and None if ``optional``)."""

    def check(value: Any) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
        return float(value)

    return check


def one_of(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    """A :attr:`Parameter.check` accepting one of ``choices``."""

    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        return value

    return check
