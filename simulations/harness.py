"""What every benchmark shares: command-line options, run configs, JSON, markdown tables and plots.

Federated runs go through the product itself: ``server.server_app.run_federation`` (the
ServerApp's round loop) over a :class:`fedcca.flower.local_grid.InProcessGrid` whose nodes call the
real ClientApp, exactly as under ``flwr run`` but without a SuperLink or Ray, whose start-up
dominates short runs on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcca.app.task import FLOWER_STRATEGIES, parse_override
from fedcca.flower.records import jsonable
from fedcca.flower.settings import REFERENCES, STATISTICS_SOURCES
from fedcca.methods.registry import ALIGNERS
from fedcca.plotting import atomic_write, figure, save

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "fedavg"


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def project_client_app() -> Any:
    """The project's ClientApp, loaded as ``flwr run`` loads it: by the reference in pyproject.toml
    (``[tool.flwr.app.components] clientapp``), with Flower's own loader."""
    from flwr.supercore.object_ref import load_app  # pylint: disable=import-outside-toplevel

    return load_app(_pyproject()["tool"]["flwr"]["app"]["components"]["clientapp"], ValueError, ROOT)


def base_run_config(**overrides: Any) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml with ``overrides`` (``_`` stands for ``-``).

    Args:
        **overrides: Run-config values to replace, e.g. ``local_epochs=5``.

    Raises:
        KeyError: An override names a key the app does not define.
    """
    config = dict(_pyproject()["tool"]["flwr"]["app"]["config"])
    for key, value in overrides.items():
        name = key.replace("_", "-")
        if name not in config:
            raise KeyError(f"run config has no key {name!r} (see [tool.flwr.app.config])")
        config[name] = value
    return config


@dataclass(frozen=True)
class StrategySpec:
    """One strategy of a comparison.

    Args:
        label: The name given on the command line (used in tables, plots and JSON).
        strategy: The run config's ``strategy`` (a CCAMerge method, "fedavg" or "fedprox").
        reference: CCAMerge reference policy.
        stats: CCAMerge statistics source.
        overrides: Further run-config keys (``(key, value)`` pairs, keys with dashes).
    """

    label: str
    strategy: str
    reference: str = "auto"
    stats: str = "client"
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        """Parse ``fedavg``, ``fedprox``, ``feddf`` or ``METHOD[:REFERENCE[:STATS]]``, each with ``[+KEY=VALUE...]``.

        Args:
            text: e.g. ``"cca:largest:server"`` or ``"cca+shrinkage=1+repair=none"``; a list value
                joins its items with ``|`` (``"feddf+distill-teacher=logits|fitted"``: commas separate strategies).

        Raises:
            ValueError: Unknown method, reference or statistics source; a malformed override.
        """
        head, *extra = text.split("+")
        try:
            overrides = tuple((key, value.replace("|", ",") if isinstance(value, str) else value)
                              for key, value in map(parse_override, extra))
        except ValueError as err:
            raise ValueError(f"strategy {text!r}: {err}") from None
        if head in FLOWER_STRATEGIES or head == "feddf":
            return cls(text, head, overrides=overrides)
        parts = head.split(":")
        if len(parts) > 3:
            raise ValueError(f"strategy {text!r}: expected METHOD[:REFERENCE[:STATS]]")
        method, reference, stats = (parts + ["auto", "client"][len(parts) - 1:])[:3]
        for what, value, choices in (("method", method, tuple(ALIGNERS)), ("reference", reference, REFERENCES),
                                     ("stats", stats, STATISTICS_SOURCES)):
            if value not in choices:
                raise ValueError(f"strategy {text!r}: {what} must be one of {choices}, got {value!r}")
        return cls(text, method, reference, stats, overrides)

    def run_config(self) -> dict[str, Any]:
        """The run-config keys this strategy sets (underscores for dashes, as ``base_run_config`` takes them)."""
        keys: dict[str, Any] = {"strategy": self.strategy}
        if self.strategy not in FLOWER_STRATEGIES:
            keys.update(reference=self.reference, stats=self.stats)
        keys.update({key.replace("-", "_"): value for key, value in self.overrides})
        return keys


def parse_strategies(text: str) -> list[StrategySpec]:
    """Parse a comma-separated ``--strategies`` value.

    Raises:
        ValueError: An unknown or repeated strategy.
    """
    specs = [StrategySpec.parse(item) for item in parse_list(text)]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--strategies lists a strategy twice: {labels}")
    return specs


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """Comma-separated CLI list, e.g. ``"1,5"`` -> ``[1, 5]`` with ``kind=int``.

    Args:
        text: The argument.
        kind: Converter of one item.
    """
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def add_runtime_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """Add the options every benchmark has: ``--data-dir``, ``--threads``, ``--out``.

    Args:
        parser: The benchmark's parser.
        default_out: Default JSON path.
    """
    parser.add_argument("--data-dir", default="", help="dataset folder ('' = the default location)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=default_out, help="JSON output (PNG and markdown beside it)")


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): run-config overrides for every run of a benchmark."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config overrides for every run (e.g. local-epochs=1, calibration-size=250)")


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` items (and ``--data-dir``) as run-config overrides, ``_`` standing for ``-``."""
    overrides = {key.replace("-", "_"): value for key, value in (parse_override(item) for item in args.set)}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    return overrides


def apply_runtime(args: argparse.Namespace) -> str | None:
    """Set torch's threads, keep Flower's log to warnings, log ours at INFO; return ``$OPENBLAS_NUM_THREADS``.

    Args:
        args: Parsed options of :func:`add_runtime_arguments`.
    """
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # it has its own console handler
    logging.getLogger("fedcca").setLevel(logging.WARNING)
    return check_blas_threads()


def check_blas_threads() -> str | None:
    """Return ``$OPENBLAS_NUM_THREADS``; warn when it is unset.

    scipy's OpenBLAS starts one spinning thread per core: on a busy 2-core machine a
    128x128 ``scipy.linalg.eigh`` then took 1.2 s instead of 3-11 ms with one thread,
    which turns CCA Merge's transforms into the dominant cost. It must be set before
    numpy is imported: ``simulations/__init__.py`` sets it for ``python -m simulations.X``.
    """
    value = os.environ.get("OPENBLAS_NUM_THREADS")
    if value is None:
        logging.getLogger(__name__).warning(
            "OPENBLAS_NUM_THREADS is unset: scipy may spin one thread per core and inflate CCA "
            "timings on a busy machine; run with OPENBLAS_NUM_THREADS=1")
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON (infinities as strings), atomically, creating the folder."""
    text = json.dumps(jsonable(payload), indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON at ``path``, or None when there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else None


def resumed(path: Path, setting: dict[str, Any]) -> dict[str, Any]:
    """The earlier results at ``path`` to resume (empty when there are none).

    Raises:
        SystemExit: They were run with another setting (``--set`` overrides): resuming would mix
            runs of two settings in one table. Use another ``--out``, or the same overrides.
    """
    payload = read_json(path) or {}
    if payload.get("runs") and payload.get("setting", setting) != setting:
        raise SystemExit(f"{path} holds runs of setting {payload['setting']}, this run's is {setting}: "
                         "pass the same --set overrides or another --out")
    return payload


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are shown with 4 significant digits.

    Args:
        headers: Column titles.
        rows: One sequence of cells per row.
    """
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))
        return text.replace("|", "\\|")  # a strategy label's list separator must not end the cell

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` in percent (sample std; 0 for one value)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{100 * float(np.mean(values)):.1f} ± {100 * std:.1f}"


@dataclass(frozen=True)
class Series:
    """One line of a plot: x, the mean y, and an optional band (low, high) or error bars."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    dashed: bool = False


def line_plot(path: Path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
              log2_x: bool = False, bands: bool = True) -> None:
    """One PNG: a line per series, with a shaded band (``bands``) or error bars from ``low``/``high``.

    Args:
        path: PNG to write.
        series: The lines.
        title: Plot title.
        xlabel: x-axis label.
        ylabel: y-axis label.
        log2_x: Log-2 x axis ticked at the values present (e.g. the number of models).
        bands: Shade ``low..high``; otherwise draw them as error bars.
    """
    fig, axes = figure(6.5, 4.2)
    for line in series:
        style = "--" if line.dashed else "-"
        if line.low is None or line.high is None:
            axes.plot(line.x, line.y, marker="o", linestyle=style, label=line.label)
        elif bands:
            (drawn,) = axes.plot(line.x, line.y, marker="o", linestyle=style, label=line.label)
            axes.fill_between(line.x, line.low, line.high, color=drawn.get_color(), alpha=0.15)
        else:
            errors = [np.subtract(line.y, line.low), np.subtract(line.high, line.y)]
            axes.errorbar(line.x, line.y, yerr=errors, marker="o", capsize=3, linestyle=style, label=line.label)
    if log2_x:
        ticks = sorted({x for line in series for x in line.x})
        axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, [str(int(t)) for t in ticks])
    axes.set(xlabel=xlabel, ylabel=ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    save(fig, path)


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                         logger: logging.Logger) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse a benchmark's command line, apply its runtime options, log the benchmark at INFO; return the
    arguments and the ``--set`` run-config overrides (:func:`overrides_of`)."""
    args = parser.parse_args(argv)
    apply_runtime(args)
    logger.setLevel(logging.INFO)
    return args, overrides_of(args)
