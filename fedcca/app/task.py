"""The run config of a fedcca federation, typed and validated once (shared by the ServerApp and ClientApp).

Every key of ``[tool.flwr.app.config]`` in pyproject.toml is a field of :class:`TaskConfig`
(dashes become underscores). The merge options become one
:class:`~fedcca.merging.config.MergeSearch` (:meth:`TaskConfig.merge_search`), the local training
options one :class:`~fedcca.training.TrainingConfig`.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedcca.data import SCHEMES
from fedcca.flower.screen import ScreenReplies, UpdateScreen
from fedcca.flower.settings import ALIGNMENT_SITES, REFERENCES, STATISTICS_SOURCES
from fedcca.merging.config import MergeConfig, MergeSearch, parse_values
from fedcca.merging.distillation import AUGMENTATIONS, MAX_COPIES, SELECTIONS, TEACHERS, DistillConfig
from fedcca.merging.merger import AVERAGES
from fedcca.merging.repair import REPAIRS
from fedcca.methods.cca import DEFAULT_RIDGES, RIDGE_MODES
from fedcca.methods.registry import ALIGNERS
from fedcca.models import MODEL_NAMES, is_model_path
from fedcca.training import LR_SCHEDULES, TrainingConfig

FLOWER_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


def strategies() -> tuple[str, ...]:
    """The values of ``strategy``: ``cca`` (CCAMerge searching the methods of ``merge-methods``),
    every other registered method that aligns one model at a time (CCAMerge with that method
    only, e.g. ``permute``, ``weight-matching``), ``feddf`` (the plain average distilled toward
    the clients' ensemble, through CCAMerge) and Flower's ``fedavg`` / ``fedprox``."""
    own = [name for name, method in ALIGNERS.items() if not method.joint and name not in ("cca", "direct")]
    return ("cca", *own, "feddf", *FLOWER_STRATEGIES)
CONFIG_TABLE = "[tool.flwr.app.config] of pyproject.toml"


class RunConfigError(ValueError):
    """A run-config key is missing, has the wrong type or an unsupported value."""


@dataclass(frozen=True)
class TaskConfig:
    """The run config of a fedcca app, typed and validated.

    Field ``x_y`` is the run-config key ``x-y`` (``[tool.flwr.app.config]`` in
    pyproject.toml, overridable with ``flwr run . --run-config "x-y=..."``).

    Args:
        strategy: One of :func:`strategies`.
        num_server_rounds: Rounds of federated training.
        fraction_train: Share of the connected nodes sampled for training each round.
        min_nodes: Nodes to wait for, and the fewest valid replies a round needs.
        round_timeout: Seconds to wait for the replies of one round.
        local_epochs: Local epochs per round.
        lr: (Peak) learning rate of the client's SGD.
        lr_schedule: "constant" (plain momentum SGD, as Flower's niid_bench) or "one-cycle"
            (Nesterov momentum; linear warm-up, then linear decay to 0 within each round).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        max_grad_norm: Clip each local step's gradient to this L2 norm (0: off).
        outlier_exposure: Weight of local training's "not mine" term: the client's own images with
            shuffled patches trained toward the uniform output (0: off; :attr:`TrainingConfig.outlier_exposure`).
        proximal_mu: FedProx's ``mu`` (used when ``strategy`` is "fedprox").
        batch_size: Client training batch size.
        max_examples_per_client: Train on a fixed random subset of at most this many examples
            of the client's shard (0: the whole shard).
        model: A ``fedcca.models`` name, or ``"package.module:Class"`` for your own model
            (built as ``Class(num_classes=..., in_channels=...)`` when it accepts them, else ``Class()``).
        width: Width multiplier of a built-in model.
        dataset: A ``fedcca.data`` dataset name.
        data_dir: Folder of the dataset files ("" = ``$FEDCCA_DATA_DIR`` or the default).
        partitioning: One of ``fedcca.data.SCHEMES``.
        alpha: Dirichlet concentration.
        labels_per_client: Labels per client of "label-quantity" (NIID-Bench's ``#C=k``).
        calibration_size: Public calibration examples (statistics, BatchNorm, REPAIR), held
            out of the training split.
        holdout_size: Further public, labelled examples on which a merge is chosen among
            candidates (0: no choice possible).
        max_test_examples: Evaluate the global model on the first this-many test examples
            (0: the whole test split).
        reference: CCAMerge reference: "auto" (the best client on the hold-out set in round 1, the global
            model after), "global", "best", "largest" or "first" (:data:`fedcca.flower.settings.REFERENCES`).
        stats: Where alignment statistics are computed: "client" or "server".
        alignment: Where models are aligned from round 2 on: "server", or "client" (each client aligns
            itself to the global model, the server sums: :mod:`fedcca.flower.client_alignment`).
        ridge: CCA ridge, read in ``ridge_mode``.
        ridge_mode: How the CCA ridge regularises: "trace", "relative" or "absolute".
        merge_methods: Comma-separated methods strategy "cca" chooses among, e.g. "cca,permute".
        shrinkage: Comma-separated candidates ``a`` of ``T_a = I + a (T - I)``, e.g.
            ``"0,0.25,0.5,1"`` (0 = FedAvg; the first value is the baseline).
        repair: Comma-separated candidates among "none", "mean", "affine" (the first is the baseline).
        zero_dead: Zero client features that are exactly 0 on the calibration data before aligning.
        balance: Balance each aligned feature's incoming and outgoing weight norms.
        strict: Refuse a model any part of which cannot be aligned (default: partial alignment,
            those parts averaged as FedAvg does).
        selection_margin: A candidate replaces the baseline only when it is more accurate on
            the held-out set (or better calibrated at equal accuracy) by more than this many
            paired standard errors.
        distill: Distil each merge toward the clients' ensemble on the calibration images,
            early-stopped on the held-out set (always on for "feddf").
        distill_teacher: Comma-separated teachers chosen among on the held-out set:
            "probabilities" (average of the clients' probabilities), "logits" (average of
            their logits, as FedDF publishes it), "label-counts" (votes weighted by each client's
            examples of the class; clients then report their label counts), "fitted" (per-client,
            per-class weights fitted on the held-out set).
        distill_steps: Most distillation steps per round.
        distill_augmentation: Comma-separated batch augmentations chosen among on the held-out
            set: "none", "shift" (random translations by up to 2 pixels, whole batch at once), "mixup"
            (pairs blended, targets alike).
        distill_copies: Augmented copies of each calibration image that the clients' models label for the
            teacher (blended with another image and shifted; 0: none; :attr:`DistillConfig.copies`).
        distill_ema: Comma-separated decays of a moving average of the student's weights (0: none), chosen
            among on the held-out set (:attr:`DistillConfig.ema`).
        distill_select: What the held-out set chooses the distilled state by: "accuracy" or "loss"
            (cross-entropy; :attr:`DistillConfig.select`).
        distill_lr: Comma-separated Adam learning rates of distillation, chosen among on the held-out set.
        distill_temperature: Comma-separated softmax temperatures of distillation, chosen among likewise.
        max_norm_ratio: Drop a reply whose update ``|w - g|`` exceeds this many median update
            norms of the round, with three replies or more (0: off; :class:`~fedcca.flower.screen.ScreenReplies`).
        max_update_norm: Drop a reply whose update ``|w - g|`` exceeds this many times the
            global model's norm ``|g|`` (0: off; holds at any number of replies).
        max_weight_ratio: A reply's merge weight is at most this many median ``num-examples`` claims
            (``inf``: FedAvg's weights; CCAMerge's ``max_weight_ratio``).
        average: How CCAMerge averages the aligned replies: "mean" (weighted by num-examples),
            "median" or "trimmed" (robust, unweighted; :data:`fedcca.merging.merger.AVERAGES`).
        seed: Seeds the split, the initial model and every round's randomness.
        out_dir: Folder for history.json, checkpoints and the plot; ``{key}`` placeholders
            are filled from the run config, e.g. ``outputs/{strategy}-seed{seed}``.
        resume: Continue from the last completed round found in ``out_dir``.
    """

    strategy: str
    num_server_rounds: int
    fraction_train: float
    min_nodes: int
    round_timeout: float
    local_epochs: int
    lr: float
    lr_schedule: str
    momentum: float
    weight_decay: float
    max_grad_norm: float
    outlier_exposure: float
    proximal_mu: float
    batch_size: int
    max_examples_per_client: int
    model: str
    width: float
    dataset: str
    data_dir: str
    partitioning: str
    alpha: float
    labels_per_client: int
    calibration_size: int
    holdout_size: int
    max_test_examples: int
    reference: str
    stats: str
    alignment: str
    merge_methods: str
    ridge: float
    ridge_mode: str
    shrinkage: str
    repair: str
    zero_dead: bool
    balance: bool
    strict: bool
    selection_margin: float
    distill: bool
    distill_teacher: str
    distill_steps: int
    distill_augmentation: str
    distill_copies: int
    distill_ema: str
    distill_select: str
    distill_lr: str
    distill_temperature: str
    max_norm_ratio: float
    max_update_norm: float
    max_weight_ratio: float
    average: str
    seed: int
    out_dir: str
    resume: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> TaskConfig:
        """Read and validate every key of ``run_config``.

        Args:
            run_config: ``context.run_config`` (keys with dashes).

        Raises:
            RunConfigError: Naming the key that is missing, mistyped or out of range.
        """
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key not in run_config:
                raise RunConfigError(f"run config lacks '{key}' (define it in {CONFIG_TABLE})")
            values[field.name] = _coerce(key, run_config[key], field.type)
        config = cls(**values)
        config._validate()
        return config

    @property
    def merge_method(self) -> str | None:
        """The CCAMerge method ("direct" for FedDF), or None for Flower's own strategies."""
        if self.strategy in FLOWER_STRATEGIES:
            return None
        return "direct" if self.strategy == "feddf" else self.strategy

    def distill_config(self) -> DistillConfig | None:
        """Server-side distillation as these keys describe it (None: off)."""
        if not (self.distill or self.strategy == "feddf"):
            return None
        return DistillConfig(teachers=parse_values(self.distill_teacher, str), steps=self.distill_steps,
                             augmentations=parse_values(self.distill_augmentation, str), copies=self.distill_copies,
                             ema=parse_values(self.distill_ema), select=self.distill_select,
                             lrs=parse_values(self.distill_lr), temperatures=parse_values(self.distill_temperature),
                             seed=self.seed)

    def merge_search(self) -> MergeSearch:
        """The merge configuration (or the candidates to choose from) these keys describe.

        Raises:
            RunConfigError: For a Flower strategy, or a choice without held-out examples.
        """
        if self.merge_method is None:
            raise RunConfigError(f"strategy {self.strategy!r} does not merge with CCAMerge")
        try:
            if self.strategy == "feddf":  # FedAvg's average, then distillation
                return MergeSearch(MergeConfig("direct", zero_dead=False))
            methods = parse_values(self.merge_methods, str) if self.strategy == "cca" else (self.merge_method,)
            shrinkages, repairs = parse_values(self.shrinkage, float), parse_values(self.repair, str)
            ridge = None if self.ridge == DEFAULT_RIDGES[self.ridge_mode] else self.ridge  # labels as the library's
            base = MergeConfig(methods[0], ridge=ridge, ridge_mode=self.ridge_mode,
                               shrinkage=shrinkages[0], repair=repairs[0], zero_dead=self.zero_dead,
                               balance=self.balance, strict=self.strict)
            grid = tuple((name, values) for name, values in (("method", methods), ("shrinkage", shrinkages),
                                                             ("repair", repairs)) if len(values) > 1)
            search = MergeSearch(base, grid, min_z=self.selection_margin)
        except ValueError as err:
            raise RunConfigError(f"run config merge options: {err}") from err
        if len(search.candidates()) > 1 and self.holdout_size == 0:
            raise RunConfigError(f"run config 'merge-methods'/'shrinkage'/'repair' list {len(search.candidates())} candidates; "
                                 "choosing among them needs 'holdout-size' > 0")
        return search

    def training(self, proximal_mu: float = 0.0) -> TrainingConfig:
        """The client's local training options (``proximal_mu``: FedProx's, from the train message)."""
        return TrainingConfig(epochs=self.local_epochs, lr=self.lr, schedule=self.lr_schedule,
                              momentum=self.momentum, nesterov=self.lr_schedule == "one-cycle",
                              weight_decay=self.weight_decay, proximal_mu=proximal_mu,
                              max_grad_norm=self.max_grad_norm or None, outlier_exposure=self.outlier_exposure)

    def output_dir(self, run_config: Mapping[str, Any]) -> Path:
        """``out_dir`` with ``{key}`` placeholders filled from ``run_config``, made absolute."""
        try:
            name = self.out_dir.format(**run_config)
        except (KeyError, IndexError, ValueError) as err:
            raise RunConfigError(f"out-dir {self.out_dir!r}: cannot fill placeholder {err}") from err
        return Path(name).expanduser().resolve()

    def _validate(self) -> None:
        _check_choice("strategy", self.strategy, strategies())
        _check_choice("partitioning", self.partitioning, SCHEMES)
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("stats", self.stats, STATISTICS_SOURCES)
        _check_choice("alignment", self.alignment, ALIGNMENT_SITES)
        _check_choice("ridge-mode", self.ridge_mode, RIDGE_MODES)
        _check_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("average", self.average, AVERAGES)
        if not self.max_weight_ratio >= 1:
            raise RunConfigError(f"max-weight-ratio must be >= 1 (inf: FedAvg's weights), got {self.max_weight_ratio!r}")
        for teacher in self.distill_teacher.split(","):
            _check_choice("distill-teacher", teacher.strip(), TEACHERS)
        for augmentation in self.distill_augmentation.split(","):
            _check_choice("distill-augmentation", augmentation.strip(), AUGMENTATIONS)
        if not 0 <= self.distill_copies <= MAX_COPIES:
            raise RunConfigError(f"run config 'distill-copies' must be in [0, {MAX_COPIES}], got {self.distill_copies!r}")
        _check_choice("distill-select", self.distill_select, SELECTIONS)
        for repair in self.repair.split(","):
            _check_choice("repair", repair.strip(), REPAIRS)
        try:
            decays = parse_values(self.distill_ema)
        except ValueError as err:
            raise RunConfigError(f"run config 'distill-ema': {err}") from None
        if not all(0 <= v < 1 for v in decays):
            raise RunConfigError(f"run config 'distill-ema' must be decays in [0, 1), got {self.distill_ema!r}")
        for key, text in (("distill-lr", self.distill_lr), ("distill-temperature", self.distill_temperature)):
            try:
                values = parse_values(text)
            except ValueError as err:
                raise RunConfigError(f"run config '{key}': {err}") from None
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise RunConfigError(f"run config '{key}' must be positive finite numbers, got {text!r}")
        if not is_model_path(self.model):
            _check_choice("model", self.model, MODEL_NAMES)
        positive = {"num-server-rounds": self.num_server_rounds, "min-nodes": self.min_nodes,
                    "round-timeout": self.round_timeout, "local-epochs": self.local_epochs,
                    "lr": self.lr, "batch-size": self.batch_size, "width": self.width,
                    "alpha": self.alpha, "calibration-size": self.calibration_size,
                    "labels-per-client": self.labels_per_client, "distill-steps": self.distill_steps}
        for key, value in positive.items():
            if not value > 0:
                raise RunConfigError(f"run config '{key}' must be positive, got {value!r}")
        for key, value in {"max-examples-per-client": self.max_examples_per_client,
                           "max-test-examples": self.max_test_examples, "holdout-size": self.holdout_size,
                           "momentum": self.momentum, "weight-decay": self.weight_decay,
                           "max-grad-norm": self.max_grad_norm, "outlier-exposure": self.outlier_exposure,
                           "proximal-mu": self.proximal_mu, "ridge": self.ridge,
                           "selection-margin": self.selection_margin, "max-norm-ratio": self.max_norm_ratio,
                           "max-update-norm": self.max_update_norm}.items():
            if value < 0:
                raise RunConfigError(f"run config '{key}' must be >= 0, got {value}")
        if self.seed < 0:
            raise RunConfigError(f"run config 'seed' must be >= 0, got {self.seed}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise RunConfigError(f"run config 'fraction-train' must be in (0, 1], got {self.fraction_train}")
        if self.merge_method is not None:
            self.merge_search()
        if self.distill_config() is not None and self.holdout_size == 0:
            raise RunConfigError("run config 'distill' (or strategy 'feddf') early-stops on the held-out set: "
                                 "set 'holdout-size' > 0")

    def update_screen(self) -> UpdateScreen | None:
        """The reply screen's bounds these keys describe (0: that bound off; None: both off)."""
        bounds = (self.max_update_norm or None, self.max_norm_ratio or None)
        return None if bounds == (None, None) else UpdateScreen(*bounds)

    def screen(self, strategy: Strategy) -> Strategy:
        """A Flower strategy wrapped in :meth:`update_screen` (CCAMerge screens its replies itself)."""
        bounds = self.update_screen()
        return strategy if bounds is None else ScreenReplies(strategy, max_update_norm=bounds.max_update_norm,
                                                             max_ratio=bounds.max_ratio)



def parse_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as TOML (``false``, ``0.5``, ``"affine"``; bare words are strings).

    Raises:
        ValueError: ``item`` is not ``KEY=VALUE``.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check ``value`` against the field type (given as a string: postponed annotations)."""
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[str(kind)]
    # bool is an int subclass: never accept True for a number, nor 1 for a flag.
    if isinstance(value, bool) != (kind == "bool") or not isinstance(value, expected):
        raise RunConfigError(f"run config '{key}' must be a {kind}, got {value!r} "
                             f"(strings need quotes: --run-config \"{key}='...'\")")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise RunConfigError(f"run config '{key}' must be finite, got {value}")
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RunConfigError(f"run config '{key}' must be one of {choices}, got {value!r}")
