"""Command line: ``fedcca merge CKPT... --calibration FILE --method cca --out merged.pt``.

A checkpoint is a ``torch.save``'d state dict, or a dict ``{"model": name, "width": w,
"num_classes": c, "in_channels": c, "state_dict": ...}`` (the format ``--out`` writes); its
fields are data: ``model`` must be a built-in name (or the class the user passes as ``--model``),
never an import path the file chooses.
Calibration data is a ``.pt`` tensor [N, C, H, W] or a ``.npy`` array, already normalised.
``--model`` is a :mod:`fedcca.models` name or your own ``package.module:Class`` (built with the
``num_classes``/``in_channels`` keywords it accepts; its alignment spec is derived by tracing).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcca.merging.config import MergeConfig
from fedcca.merging.merger import merge
from fedcca.merging.repair import REPAIRS
from fedcca.methods.cca import canonical_correlations, resolved_ridge
from fedcca.methods.registry import ALIGNERS, parameters
from fedcca.models import MODEL_NAMES, is_model_path
from fedcca.plotting import atomic_write
from fedcca.statistics import collect_statistics

_ARCH_FIELDS = ("model", "width", "num_classes", "in_channels")
_DEFAULTS = {"model": "cnn", "width": 1, "num_classes": 10}
# Failures caused by the user's files or options: one line on stderr, exit code 2.
_USER_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedcca`` command line; returns the exit code (0 ok, 2 on a usage or input error).

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage error / help
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except (CliError, *_USER_ERRORS) as err:
        print(f"fedcca {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcca", description="CCA Merge for Flower models.")
    parser.add_argument("--version", action="version", version=f"fedcca {version('fedcca')}")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("merge", help="merge checkpoints of one architecture into one model")
    sub.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT", help="checkpoint files")
    sub.add_argument("--calibration", type=Path, required=True,
                     help=".pt tensor or .npy array of normalised inputs [N, C, H, W]")
    sub.add_argument("--method", choices=tuple(ALIGNERS), default="cca", help="alignment method (default cca)")
    sub.add_argument("--reference", type=int, default=0, help="index of the reference checkpoint")
    for parameter in parameters().values():  # every method's own parameters, as their modules declare them
        sub.add_argument(f"--{parameter.name.replace('_', '-')}", dest=parameter.name, type=parameter.kind,
                         default=None, help=f"{parameter.help} (default {parameter.default})")
    sub.add_argument("--shrinkage", type=float, default=1.0,
                     help="apply I + a (T - I) instead of each transform T (1: as is, 0: plain average)")
    sub.add_argument("--repair", choices=REPAIRS, default="affine",
                     help="correct pre-activation statistics after averaging (default affine: REPAIR "
                          "measured better for offline merges, CHANGELOG.md; 'none' = the paper's merge)")
    sub.add_argument("--out", type=Path, default=Path("merged.pt"), help="output checkpoint")
    sub.add_argument("--model", default=None,
                     help="architecture: a fedcca.models name or package.module:Class (default: from "
                          "checkpoints, else cnn)")
    sub.add_argument("--width", type=float, default=None, help="width multiplier")
    sub.add_argument("--num-classes", type=int, default=None, help="number of classes")
    sub.add_argument("--in-channels", type=int, default=None,
                     help="input channels (default: from checkpoints, else the calibration data)")
    sub.add_argument("--batch-size", type=int, default=256, help="calibration batch size")
    sub.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    sub.add_argument("--no-recompute-bn", dest="recompute_bn", action="store_false",
                     help="keep the averaged BatchNorm statistics")
    sub.set_defaults(run=_merge_command)
    return parser


def _merge_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_output(args.out, [*args.checkpoints, args.calibration])
    calibration = _load_calibration(args.calibration)
    loaded = [_load_checkpoint(path) for path in args.checkpoints]
    arch = _architecture(args, [meta for meta, _ in loaded], args.checkpoints, calibration)
    if not -len(loaded) <= args.reference < len(loaded):
        raise CliError(f"--reference {args.reference} is not an index into the {len(loaded)} checkpoints")
    models = []
    for path, (_, state_dict) in zip(args.checkpoints, loaded):
        model = _build(arch)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[1:2] or [str(err)]
            width = "" if _is_user_model(arch) else f"width {arch['width']}, "
            raise CliError(f"{path} does not fit {arch['model']} ({width}"
                           f"{arch['num_classes']} classes, {arch['in_channels']} input channels): "
                           f"{first[0].strip()}") from None
        models.append(model)
    if len(models) < 2:
        raise CliError(f"merging needs at least 2 checkpoints, got {len(models)}")
    _check_fits(models[0], calibration, args.calibration, arch)
    given = {name: getattr(args, name) for name in parameters() if getattr(args, name) is not None}
    try:
        config = MergeConfig(args.method, shrinkage=args.shrinkage, repair=args.repair,
                             recompute_bn=args.recompute_bn, **given)
    except ValueError as err:
        raise CliError(str(err)) from None
    statistics = None
    if config.needs_statistics:
        statistics = collect_statistics(models[args.reference], models, calibration,
                                        device=args.device, batch_size=args.batch_size)
    merged = merge(models, calibration, config, reference=args.reference, statistics=statistics,
                   device=args.device, batch_size=args.batch_size)
    atomic_write(args.out, lambda tmp: torch.save({**arch, "method": args.method, "state_dict": merged.state_dict()},
                                                  tmp))
    _print_summary(args, config, len(models), statistics, time.perf_counter() - started)
    return 0


def _is_user_model(arch: dict[str, Any]) -> bool:
    return is_model_path(arch["model"])


def _build(arch: dict[str, Any]) -> torch.nn.Module:
    """A fresh model of the architecture: built-in by name, or the user's ``package.module:Class``."""
    # Deferred imports: argument errors need no model code.
    if _is_user_model(arch):
        from fedcca.app.federation import build_user_model

        if os.getcwd() not in sys.path and "" not in sys.path:  # `--model mypkg.task:Net` from the app's folder
            sys.path.insert(0, os.getcwd())
        return build_user_model(arch["model"], arch["num_classes"], arch["in_channels"],
                                label=f"--model {arch['model']!r}")
    from fedcca.models import build_model

    return build_model(arch["model"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                       width=arch["width"])


def _print_summary(args: argparse.Namespace, config: MergeConfig, count: int, statistics: Any,
                   seconds: float) -> None:
    print(f"method: {config.method}  models: {count}  reference: {args.reference}  ({config.label()})")
    if statistics is not None:
        points = list(statistics[0])
        print(f"points aligned: {len(points)} ({', '.join(points)})")
        if config.method == "cca":
            others = [stats for k, stats in enumerate(statistics) if k != args.reference % count]
            ridge, mode = resolved_ridge(config.method_options()), config.ridge_mode
            for point in points:
                means = [canonical_correlations(stats[point], ridge, ridge_mode=mode, point=point).mean().item()
                         for stats in others]
                print(f"  {point}: mean regularised canonical correlation {np.mean(means) if means else 1.0:.4f}"
                      f" (ridge {ridge:g}, {mode} mode)")
    print(f"wrote {args.out} in {seconds:.2f} s")


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    """Before any work: ``out`` is none of the inputs and its folder can be written."""
    for path in inputs:
        if out.resolve() == path.resolve():
            raise CliError(f"--out {out} is one of the inputs; choose another output file")
    folder = out.resolve().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK)) or (out.exists() and not os.access(out, os.W_OK)):
        raise CliError(f"--out {out}: cannot write there ({existing} is not a writable folder)")


def _load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture fields found, state dict) of one checkpoint file."""
    if not path.is_file():
        raise CliError(f"checkpoint {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pylint: disable=broad-except  # empty, truncated, pickled code: torch's many errors
        raise CliError(f"{path} cannot be read as a checkpoint ({type(err).__name__}); save a state dict with "
                       "torch.save(model.state_dict(), path)") from None
    if not isinstance(content, dict):
        raise CliError(f"{path} holds a {type(content).__name__}, not a state dict")
    if "state_dict" in content:
        meta = {field: content[field] for field in _ARCH_FIELDS if field in content}
        content = content["state_dict"]
    else:
        meta = {}
    if not content or not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise CliError(f"{path} is not a state dict of tensors")
    bad = [key for key, value in content.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CliError(f"{path} has non-finite values in {bad[0]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1
                                                                        else ""))
    return meta, dict(content)


def _check_metadata(meta: dict[str, Any], path: Path, option: str | None) -> None:
    """A checkpoint's architecture fields are plain values: a registry name, positive sizes.

    A model named by the file that is not built in is refused unless the user named the same
    class with ``--model`` (the file cannot choose the code that runs).
    """
    name = meta.get("model")
    if name is not None:
        if not isinstance(name, str):
            raise CliError(f"{path}: checkpoint field 'model' must be a model name, got {type(name).__name__}")
        if name not in MODEL_NAMES and name != option:
            raise CliError(f"{path} names model {name!r}, which is not built in ({', '.join(MODEL_NAMES)}); "
                           "a checkpoint never chooses code to import: pass --model yourself if you trust it")
    for field in ("num_classes", "in_channels"):
        value = meta.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CliError(f"{path}: checkpoint field {field!r} must be a positive integer, got {value!r}")
    width = meta.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float))
                              or not 0 < width < float("inf")):
        raise CliError(f"{path}: checkpoint field 'width' must be a positive number, got {width!r}")


def _check_fits(model: torch.nn.Module, calibration: torch.Tensor, path: Path, arch: dict[str, Any]) -> None:
    """Before any work: one calibration sample runs through the model."""
    try:
        with torch.no_grad():
            model.eval()(calibration[:2])
    except Exception as err:  # pylint: disable=broad-except  # any shape or dtype mismatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"calibration file {path} (shape {tuple(calibration.shape)}) does not fit --model "
                       f"{arch['model']}: {first}") from None


def _load_calibration(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise CliError(f"calibration file {path} does not exist")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pylint: disable=broad-except  # empty, truncated, foreign files
        raise CliError(f"calibration file {path} cannot be read ({type(err).__name__}); save a tensor with "
                       "torch.save(x, path) or numpy.save") from None
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or len(data) == 0:
        raise CliError(f"calibration file {path} must hold a non-empty tensor [N, C, ...]")
    if not data.is_floating_point():
        raise CliError(f"calibration file {path} holds {data.dtype} values; save normalised floats")
    data = data.float()  # finiteness after the cast: 1e200 in float64 is inf in float32
    if not torch.isfinite(data).all():
        raise CliError(f"calibration file {path} has values that are not finite in float32")
    return data


def _architecture(args: argparse.Namespace, metas: list[dict[str, Any]], paths: list[Path],
                  calibration: torch.Tensor) -> dict[str, Any]:
    """Architecture fields: options, else checkpoint metadata (must agree), else defaults.

    Metadata is data: a checkpoint may name a built-in model (:data:`fedcca.models.MODEL_NAMES`),
    never code to import; only ``--model`` on the command line can name the user's own class.
    """
    for meta, path in zip(metas, paths):
        _check_metadata(meta, path, args.model)
    arch: dict[str, Any] = {}
    for field in _ARCH_FIELDS:
        found = {(meta[field], str(path)) for meta, path in zip(metas, paths) if field in meta}
        values = {value for value, _ in found}
        if len(values) > 1:
            raise CliError(f"architecture mismatch between checkpoints: {field} differs "
                           f"({', '.join(f'{p}: {v}' for v, p in sorted(found, key=str))})")
        option = getattr(args, field)
        if option is not None and values and option not in values:
            raise CliError(f"--{field.replace('_', '-')} {option} but the checkpoints say {values.pop()}")
        default = calibration.shape[1] if field == "in_channels" else _DEFAULTS[field]
        arch[field] = option if option is not None else (values.pop() if values else default)
    return arch


if __name__ == "__main__":
    sys.exit(main())
