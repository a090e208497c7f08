"""The files of one federated run: ``history.json`` and per-round checkpoints (the plot: :mod:`fedcca.flower.recording`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedcca.flower.recording import HISTORY_FILE
from fedcca.plotting import atomic_write

CHECKPOINT_DIR = "checkpoints"
# Keys that may change between a run and its resumption without changing the results.
RESUMABLE_KEYS = frozenset({"num-server-rounds", "resume", "round-timeout", "out-dir"})


class RunDirectory:
    """The files of one run under ``out-dir``: history, per-round checkpoints and the plot.

    Every file is written to a temporary name and moved into place with ``os.replace``,
    so a run killed mid-write leaves the previous version intact.

    Args:
        path: The output folder (created on first save).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def fresh(cls, path: Path) -> RunDirectory:
        """``path`` if it holds no run yet, else the first free ``path-2``, ``path-3``, ...

        A new run never overwrites or mixes with an earlier run's history and checkpoints
        (``resume = true`` continues that run instead).
        """
        for folder in (path, *path.parents):
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"out-dir {path}: {folder} is a file, not a folder; choose another out-dir")
        candidate, index = path, 1
        while (candidate / HISTORY_FILE).exists() or (candidate / CHECKPOINT_DIR).exists():
            index += 1
            candidate = path.with_name(f"{path.name}-{index}")
        if candidate != path:
            log(WARNING, "[fedcca] %s already holds a run (resume = false): writing this one to %s", path, candidate)
        return cls(candidate)

    @property
    def history_path(self) -> Path:
        """``history.json`` of the run."""
        return self.path / HISTORY_FILE

    def checkpoint_path(self, server_round: int) -> Path:
        """The checkpoint of the global model after ``server_round``."""
        return self.path / CHECKPOINT_DIR / f"round-{server_round:03d}.pt"

    def save(self, server_round: int, arrays: ArrayRecord, history: Mapping[str, Any]) -> None:
        """Write the checkpoint of ``server_round``, then the history that records it.

        In this order, a history entry always has its checkpoint on disk.
        """
        checkpoint = self.checkpoint_path(server_round)
        atomic_write(checkpoint, lambda tmp: torch.save(
            {"round": server_round, "state_dict": arrays.to_torch_state_dict()}, tmp))
        atomic_write(self.history_path, lambda tmp: tmp.write_text(json.dumps(history, indent=2)))

    def load(self, run_config: Mapping[str, Any],
             template: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, Any]] | None:
        """The global model and history after the newest round whose checkpoint is usable, or None to start afresh.

        A checkpoint is usable when it loads and holds exactly ``template``'s keys and shapes,
        with finite values. Rounds recorded after the newest usable checkpoint are dropped from
        the history (logged), so the run continues from a model it can trust.

        Args:
            run_config: This run's config; it must match the recorded one except for
                :data:`RESUMABLE_KEYS`.
            template: A state dict of the model (``model_fn().state_dict()``).

        Raises:
            ValueError: One line naming the file: an unreadable or foreign history, a
                different run config, or no usable checkpoint for a recorded round.
        """
        if not self.history_path.is_file():
            log(INFO, "[fedcca] resume: no %s yet, starting from round 1", self.history_path)
            return None
        history = self._read_history()
        _check_same_config(history["run_config"], run_config, self.history_path)
        done = len(history["rounds"])
        if not all(isinstance(entry, dict) for entry in history["rounds"]) \
                or [entry.get("round") for entry in history["rounds"]] != list(range(1, done + 1)):
            raise ValueError(f"{self.history_path}: rounds are not 1..{done}; cannot resume "
                             "(set resume = false: a new run goes to a fresh folder)")
        problems = []
        for server_round in range(done, 0, -1):
            try:
                state = self._checkpoint(server_round, template)
            except ValueError as err:
                problems.append(str(err))
                continue
            if problems:
                log(WARNING, "[fedcca] resume: %s; resuming after round %d (rounds %d-%d dropped from the history)",
                    "; ".join(problems), server_round, server_round + 1, done)
            history["rounds"] = history["rounds"][:server_round]
            history["run_config"] = dict(run_config)
            return ArrayRecord(state), history
        if done == 0:
            return None
        raise ValueError(f"cannot resume from {self.path}: no usable checkpoint ({'; '.join(problems)}); "
                         "set resume = false to start a new run (it goes to a fresh folder)")

    def _read_history(self) -> dict[str, Any]:
        try:
            history = json.loads(self.history_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot resume: {self.history_path} is not readable JSON ({err}); "
                             "set resume = false to start a new run (it goes to a fresh folder)") from None
        if not isinstance(history, dict) or not isinstance(history.get("run_config"), dict) \
                or not isinstance(history.get("rounds"), list) or "initial" not in history:
            raise ValueError(f"cannot resume: {self.history_path} lacks 'run_config', 'initial' or 'rounds' "
                             "(not a fedcca history); set resume = false to start a new run")
        return history

    def _checkpoint(self, server_round: int, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict of ``server_round``'s checkpoint, checked against ``template`` (ValueError naming the file)."""
        path = self.checkpoint_path(server_round)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path} is missing") from None
        except Exception as err:  # pylint: disable=broad-except  # truncated, empty, foreign: torch's many errors
            raise ValueError(f"{path} cannot be loaded ({type(err).__name__})") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("round") != server_round \
                or not isinstance(checkpoint.get("state_dict"), dict):
            raise ValueError(f"{path} is not the checkpoint of round {server_round}")
        state = checkpoint["state_dict"]
        if set(state) != set(template):
            raise ValueError(f"{path} has other keys than the model (e.g. {sorted(set(state) ^ set(template))[:2]})")
        for key, value in template.items():
            if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
                raise ValueError(f"{path}: '{key}' has another shape than the model's {tuple(value.shape)}")
            if state[key].dtype != value.dtype:  # 1e300 in float64 is finite, and inf once loaded as float32
                raise ValueError(f"{path}: '{key}' is {state[key].dtype}, the model's is {value.dtype}")
            if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
                raise ValueError(f"{path}: '{key}' has non-finite values")
        return state


def _check_same_config(recorded: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    keys = (set(recorded) | set(current)) - RESUMABLE_KEYS
    differing = sorted(key for key in keys if recorded.get(key) != current.get(key))
    if differing:
        details = ", ".join(f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in differing)
        raise ValueError(f"cannot resume from {where}: the run config differs ({details})")
