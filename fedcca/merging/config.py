"""How to merge: one frozen, validated configuration for ``merge``, ``CCAMerge``, the CLI and the run config.

A :class:`MergeConfig` says how every model is aligned to the reference and what happens
after averaging. A :class:`MergeSearch` is a set of candidate configurations of which one is
chosen per merge on labelled held-out data (e.g. the shrinkage of the transforms towards the
identity, or the CCA ridge). Both are validated once, when built; every other module reads
their typed fields.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedcca.merging.repair import REPAIRS
from fedcca.methods.registry import ALIGNERS, aligner, parameters

_COMMON = ("method", "shrinkage", "repair", "zero_dead", "balance", "recompute_bn", "fold_bn", "points", "strict")


def merge_keywords() -> tuple[str, ...]:
    """Every keyword a :class:`MergeConfig` accepts: its fields and the registered methods' parameters."""
    return (*_COMMON, *parameters())


@dataclass(frozen=True, init=False)
class MergeConfig:
    """How models are aligned to the reference and averaged.

    Besides the fields below, a method's own parameters (declared in its module of
    :mod:`fedcca.methods`, e.g. CCA's ``ridge`` and ``ridge_mode``, Permute's ``max_scale``,
    Blend's ``blend``) are keywords too: ``MergeConfig(method="cca", ridge=0.5)``; read them
    as attributes (``config.ridge``: the given value or the method's default) or all at once
    with :meth:`method_options`. Parameters the method does not declare are kept (a search
    over methods shares one base) and ignored by it.

    Args:
        method: Name of a registered method (:data:`fedcca.methods.registry.ALIGNERS`): "cca"
            (CCA Merge), "permute", "weight-matching", "blend", "zipit" or "direct" (no
            alignment: the plain average).
        shrinkage: ``a`` in ``T_a = I + a (T - I)``: 1 applies the aligner's transforms as they
            are, 0 none (the plain average, i.e. FedAvg), values between shrink every
            transform towards the identity.
        repair: One of :data:`fedcca.merging.repair.REPAIRS`: correct the merged pre-activation
            statistics towards the aligned models' after averaging ("affine" is REPAIR).
        zero_dead: Zero the weights of features that are exactly 0 on the calibration data
            (dead ReLU units) in every model before aligning (statistics-based methods).
        balance: After averaging, rescale every feature whose transform moved it so that the
            ratio of its incoming to outgoing weight norms is the reference's (function
            preserving; keeps aligned merges trainable).
        recompute_bn: Recompute BatchNorm running statistics of the result on the calibration data.
        fold_bn: When aligning a model with BatchNorm, fold each BatchNorm into its producer first
            (:func:`fedcca.merging.batchnorm.fold_batchnorm`; needs the spec's ``norms``), and after
            averaging (with ``recompute_bn``) give each BatchNorm the real statistics of its
            inputs (:func:`fedcca.merging.batchnorm.refit_batchnorm`) and the aligned models' average
            output mean and std per channel (:func:`fedcca.merging.repair.restore_norms`; one more
            forward pass per model): a dense transform then keeps each aligned pre-activation
            exact, and the average gets back the spread BatchNorm re-estimation gives an
            unfolded merge. Unaligned candidates (``direct``, shrinkage 0) are averaged
            unfolded, as FedAvg does.
        points: Align only these points (others are averaged as they are); None: all.
        strict: For a model whose spec is derived from its fx graph: refuse it when any part
            cannot be aligned (an unsupported layer or op, named). Otherwise (partial
            alignment, the default) those parts are averaged as FedAvg does, logged once and
            listed in the spec's ``left``.
        options: Method parameters as ``(name, value)`` pairs (what keywords fill in).
        **parameters: Method parameters by name.

    Raises:
        TypeError: A keyword no registered method declares.
        ValueError: An invalid value, naming it.
    """

    method: str = "cca"
    shrinkage: float = 1.0
    repair: str = "none"
    zero_dead: bool = True
    balance: bool = True
    recompute_bn: bool = True
    fold_bn: bool = True
    points: tuple[str, ...] | None = None
    strict: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, method: str = "cca", shrinkage: float = 1.0, repair: str = "none", zero_dead: bool = True,
                 balance: bool = True, recompute_bn: bool = True, fold_bn: bool = True,
                 points: Sequence[str] | None = None, strict: bool = False,
                 options: Iterable[tuple[str, Any]] = (), **parameters: Any) -> None:
        for name, value in (("method", method), ("shrinkage", shrinkage), ("repair", repair),
                            ("zero_dead", zero_dead), ("balance", balance), ("recompute_bn", recompute_bn),
                            ("fold_bn", fold_bn), ("points", points), ("strict", strict)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "options", _checked_options({**dict(options), **parameters}))
        self._validate()

    def _validate(self) -> None:
        try:
            method = aligner(self.method)
        except ValueError as err:
            raise ValueError(f"MergeConfig: {err}") from None
        _check_choice("repair", self.repair, REPAIRS)
        value = _number("shrinkage", self.shrinkage)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"MergeConfig: shrinkage must be in [0, 1], got {value}")
        object.__setattr__(self, "shrinkage", value)
        for name in ("zero_dead", "balance", "recompute_bn", "fold_bn", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MergeConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if self.points is not None:
            if isinstance(self.points, str) or not all(isinstance(p, str) for p in self.points):
                raise ValueError(f"MergeConfig: points must be a sequence of point names, got {self.points!r}")
            object.__setattr__(self, "points", tuple(self.points))
        if method.check_options is not None:
            try:
                method.check_options(self.method_options())
            except ValueError as err:
                raise ValueError(f"MergeConfig: {err}") from None

    def __getattr__(self, name: str) -> Any:
        # A method parameter read as an attribute: the given value or its declared default.
        if name.startswith("_") or name == "options":
            raise AttributeError(name)
        declared = parameters()
        if name not in declared:
            raise AttributeError(f"'MergeConfig' has no field or method parameter {name!r}")
        return dict(self.options).get(name, declared[name].default)

    def method_options(self) -> dict[str, Any]:
        """Every parameter of this configuration's method: given, or its default."""
        return ALIGNERS[self.method].options(dict(self.options))

    @property
    def aligns(self) -> bool:
        """Whether any transform is applied (False for "direct" and for shrinkage 0)."""
        return self.method != "direct" and self.shrinkage > 0 and self.points != ()

    @property
    def needs_statistics(self) -> bool:
        """Whether the aligner reads activation statistics (also for zeroing dead features)."""
        return self.aligns and ALIGNERS[self.method].needs_statistics

    def replace(self, **changes: Any) -> MergeConfig:
        """A copy with ``changes`` (fields or method parameters) applied and validated."""
        fields = {name: getattr(self, name) for name in _COMMON}
        options = dict(self.options)
        for name, value in changes.items():
            if name in _COMMON:
                fields[name] = value
            elif name == "options":
                options = dict(value)
            else:
                options[name] = value
        return MergeConfig(**fields, options=tuple(options.items()))

    def label(self) -> str:
        """A short description for logs and tables, e.g. ``cca a=0.5 +affine``."""
        if not self.aligns:
            text = "direct"
        else:
            text = ALIGNERS[self.method].label(dict(self.options))
            if self.shrinkage != 1.0:
                text += f" a={self.shrinkage:g}"
        if self.repair != "none":
            text += f" +{self.repair}"
        return text

    def to_json(self) -> dict[str, Any]:
        """The fields and the method's parameters as one flat dict (for records and tables)."""
        return {**{name: getattr(self, name) for name in _COMMON}, **self.method_options()}

    @classmethod
    def from_options(cls, config: MergeConfig | None = None, **options: Any) -> MergeConfig:
        """``config`` (default: the defaults) with any field or method parameter given as a keyword replaced.

        Lets ``merge(models, calibration, method="permute")`` and friends take the fields
        directly without re-declaring them.

        Raises:
            TypeError: A keyword that is neither a field nor a registered method's parameter.
        """
        _check_keywords(options)
        base = cls() if config is None else config
        return base.replace(**options) if options else base


@dataclass(frozen=True)
class MergeSearch:
    """Candidate merge configurations; one is chosen per merge on labelled held-out data.

    The candidates are ``base`` with every combination of the ``grid`` values. The first
    candidate is the *baseline* (e.g. shrinkage 0 = FedAvg): another one replaces it only when
    its held-out loss is lower by more than ``min_z`` paired standard errors (0: the lowest
    mean loss wins). See :func:`fedcca.merging.selection.choose`.

    Args:
        base: The configuration the grid varies.
        grid: ``(field name, values)`` pairs of :class:`MergeConfig` fields, e.g.
            ``(("shrinkage", (0.0, 0.5, 1.0)),)``.
        min_z: Margin over the baseline, in paired standard errors of the per-example loss.
        description: One line for tables and reports.
    """

    base: MergeConfig = dataclasses.field(default_factory=MergeConfig)
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    min_z: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        names = set(merge_keywords())
        grid = tuple((str(name), tuple(values)) for name, values in self.grid)
        for name, values in grid:
            if name not in names:
                raise ValueError(f"MergeSearch: {name!r} is neither a MergeConfig field nor a method parameter")
            if not values:
                raise ValueError(f"MergeSearch: no values for {name!r}")
        if len({name for name, _ in grid}) != len(grid):
            raise ValueError(f"MergeSearch: a field appears twice in the grid {[n for n, _ in grid]}")
        object.__setattr__(self, "grid", grid)
        if not _number("min_z", self.min_z) >= 0:
            raise ValueError(f"MergeSearch: min_z must be >= 0, got {self.min_z}")
        self.candidates()  # every combination must be a valid MergeConfig

    def candidates(self) -> list[MergeConfig]:
        """Every distinct configuration of the grid, the baseline first (grid order).

        Configurations that align nothing (shrinkage 0, or "direct") merge identically
        whatever their method, ridge or blend: only the first of them is kept. When the grid
        varies the method, methods whose transforms are permutations (not
        :attr:`~fedcca.methods.registry.Aligner.shrinkable`) get no partial shrinkage ``0 < a < 1``.
        """
        names = [name for name, _ in self.grid]
        seen: set[tuple] = set()
        out = []
        for values in itertools.product(*(values for _, values in self.grid)):
            config = self.base.replace(**dict(zip(names, values)))
            if "method" in names and 0 < config.shrinkage < 1 and not ALIGNERS[config.method].shrinkable:
                continue
            same = config if config.aligns else config.replace(method="direct", shrinkage=1.0, options=(), points=None)
            key = (same.method, same.shrinkage, same.repair, same.zero_dead, same.balance, same.recompute_bn,
                   same.fold_bn, same.points, same.strict, tuple(sorted(same.method_options().items())))
            if key not in seen:
                seen.add(key)
                out.append(config)
        return out

    @classmethod
    def of(cls, choices: MergeConfig | MergeSearch | Sequence[MergeConfig] | None) -> MergeSearch:
        """A search from a single configuration (no choice), a search, or None (the defaults)."""
        if choices is None:
            return cls()
        if isinstance(choices, MergeSearch):
            return choices
        if isinstance(choices, MergeConfig):
            return cls(base=choices)
        raise TypeError(f"expected a MergeConfig or a MergeSearch, got {type(choices).__name__}")


def resolve_search(choices: MergeConfig | MergeSearch | str | None = None, *, default: MergeConfig | MergeSearch | None = None,
                   **options: Any) -> MergeSearch:
    """The one place that turns a user's "how to merge" into a :class:`MergeSearch`.

    Args:
        choices: A :class:`MergeConfig`, a :class:`MergeSearch`, a method name, or None (``default``).
        default: What None means (None: the :class:`MergeConfig` defaults).
        **options: :class:`MergeConfig` fields. A field the search varies (a grid axis)
            replaces that axis: ``repair="affine"`` on a search over ``repair`` fixes it to
            "affine" instead of being overwritten by the grid; every other field replaces the
            base's.

    Raises:
        TypeError: An option that is not a :class:`MergeConfig` field.
        ValueError: An invalid value (naming it).
    """
    if choices is None:
        choices = default
    if isinstance(choices, str):
        choices = MergeConfig(method=choices)
    search = MergeSearch.of(choices)
    if not options:
        return search
    base = MergeConfig.from_options(search.base, **options)
    grid = tuple((name, values) for name, values in search.grid if name not in options)
    return MergeSearch(base, grid, search.min_z, search.description)


def parse_values(text: str, kind: type = float) -> tuple[Any, ...]:
    """A comma-separated list (``"0, 0.5, 1"``) as a tuple of ``kind``; ``inf`` allowed for floats.

    Args:
        text: The list.
        kind: Type of every value.

    Raises:
        ValueError: An empty list or an item that is not a ``kind``.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    try:
        return tuple(kind(item) for item in items)
    except ValueError as err:
        raise ValueError(f"cannot read {text!r} as a list of {kind.__name__}: {err}") from None


def _checked_options(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Method parameters validated by their declarations, sorted by name; defaults left out."""
    _check_keywords(values)
    declared = parameters()
    out = []
    for name in sorted(values):
        try:
            value = declared[name].check(values[name])
        except ValueError as err:
            raise ValueError(f"MergeConfig: {err}") from None
        if value != declared[name].default:
            out.append((name, value))
    return tuple(out)


def _check_keywords(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(merge_keywords()))
    if unknown:
        raise TypeError(f"unknown merge option(s) {unknown}; MergeConfig takes {list(merge_keywords())}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"MergeConfig: {name} must be a number, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
