"""Server-side distillation of a merged model toward the clients' ensemble on public data.

After a merge, the merged model (the *student*) is trained to match the clients' average
prediction (the *teacher*) on the unlabelled public calibration images, and early-stopped
on the labelled public hold-out set; nothing else is read (never test data). The teacher is
additive: every client adds its weighted outputs on the calibration images to a running
sum (:class:`TeacherSum`), so server memory does not grow with the number of clients.

Two teachers:

- ``"probabilities"``: the average of the clients' softmax outputs, weighted like the merge.
  Under label skew a client's logits for labels it never saw carry no meaning, but its
  probabilities for them are near zero, so the average of probabilities stays a sensible
  ensemble (measured: CHANGELOG.md, 0.1.0).
- ``"logits"``: the average of the clients' logits, as FedDF (Lin et al., NeurIPS 2020) does.

The teacher, steps, learning rate, temperature and augmentation are chosen on the hold-out set: every
combination of :class:`DistillConfig`'s grids is trained from the same start, evaluated
every ``eval_every`` steps, and the state with the best hold-out accuracy — the merged
model itself included, so distillation never makes the hold-out accuracy worse — is kept.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedcca.devices import resolve_device
from fedcca.merging.selection import holdout_logits
from fedcca.statistics import running_on

TEACHERS: tuple[str, ...] = ("probabilities", "logits")
AUGMENTATIONS: tuple[str, ...] = ("none", "shift")


@dataclass(frozen=True)
class DistillConfig:
    """How the merged model is distilled toward the clients' ensemble.

    Args:
        teachers: Teachers to try: "probabilities" (average of the clients' softmax
            outputs) and/or "logits" (average of their logits: FedDF).
        steps: Most optimiser steps per trial.
        lrs: Adam learning rates to try.
        temperatures: Softmax temperatures to try (the loss is ``T^2 KL(teacher_T || student_T)``).
        augmentations: Batch augmentations to try: "none", or "shift" (random translations
            by up to 2 pixels, whole batch at once; the teacher's target is the unshifted image's).
        batch_size: Public images per step.
        eval_every: Steps between hold-out evaluations.
        patience: Evaluations without a hold-out improvement before a trial stops.
        seed: Seeds the batch order and augmentation.
    """

    teachers: tuple[str, ...] = ("probabilities", "logits")
    steps: int = 2000
    lrs: tuple[float, ...] = (1e-3,)
    temperatures: tuple[float, ...] = (1.0,)
    augmentations: tuple[str, ...] = ("none",)
    batch_size: int = 64
    eval_every: int = 50
    patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        teachers = (self.teachers,) if isinstance(self.teachers, str) else tuple(self.teachers)
        if not teachers or any(t not in TEACHERS for t in teachers):
            raise ValueError(f"DistillConfig: teachers must be among {TEACHERS}, got {self.teachers!r}")
        object.__setattr__(self, "teachers", teachers)
        for name in ("steps", "batch_size", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DistillConfig: {name} must be a positive integer, got {value!r}")
        for name in ("lrs", "temperatures"):
            values = tuple(float(v) for v in getattr(self, name))
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"DistillConfig: {name} must be positive finite numbers, got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)
        augmentations = tuple(self.augmentations)
        if not augmentations or any(a not in AUGMENTATIONS for a in augmentations):
            raise ValueError(f"DistillConfig: augmentations must be among {AUGMENTATIONS}, got {self.augmentations!r}")
        object.__setattr__(self, "augmentations", augmentations)


class TeacherSum:
    """Running weighted sums of the clients' outputs on the calibration images.

    Adding clients in any order or grouping gives the same teacher (up to float rounding):
    the sums are additive, and memory is ``N x C`` per teacher and temperature whatever the
    number of clients.

    Args:
        teachers: "probabilities" and/or "logits".
        temperatures: Temperatures the probabilities are kept at (the softmax does not
            commute with the average, so one sum per temperature).
    """

    def __init__(self, teachers: Sequence[str], temperatures: Sequence[float]) -> None:
        teachers = (teachers,) if isinstance(teachers, str) else tuple(teachers)
        if not teachers or any(t not in TEACHERS for t in teachers):
            raise ValueError(f"teachers must be among {TEACHERS}, got {teachers!r}")
        self.teachers = teachers
        self.temperatures = tuple(float(t) for t in temperatures)
        self.weight = 0.0
        self._sums: dict[tuple[str, float], torch.Tensor] = {}

    def add(self, logits: torch.Tensor, weight: float) -> None:
        """Add one client's ``[N, C]`` logits on the calibration images with its merge weight.

        Raises:
            ValueError: Non-finite logits, a shape that differs from the earlier clients', a bad weight.
        """
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"teacher: weight must be finite and >= 0, got {weight!r}")
        if logits.dim() != 2 or not torch.isfinite(logits).all():
            raise ValueError(f"teacher: client outputs must be finite [N, C] logits, got shape {tuple(logits.shape)}")
        logits = logits.detach().double().cpu()
        terms: dict[tuple[str, float], torch.Tensor] = {}
        if "logits" in self.teachers:
            terms[("logits", 1.0)] = logits
        if "probabilities" in self.teachers:
            terms.update({("probabilities", t): F.softmax(logits / t, dim=1) for t in self.temperatures})
        for key, term in terms.items():
            previous = self._sums.get(key)
            if previous is not None and previous.shape != term.shape:
                raise ValueError(f"teacher: client outputs of shape {tuple(term.shape)}, earlier ones "
                                 f"{tuple(previous.shape)}")
            self._sums[key] = weight * term if previous is None else previous + weight * term
        self.weight += weight

    def targets(self, teacher: str, temperature: float) -> torch.Tensor:
        """The ``[N, C]`` probabilities of ``teacher`` at ``temperature``."""
        if self.weight <= 0:
            raise ValueError("teacher: no client outputs with a positive weight were added")
        if teacher == "logits":
            return F.softmax(self._sums[("logits", 1.0)] / self.weight / temperature, dim=1)
        return self._sums[("probabilities", float(temperature))] / self.weight


@dataclass
class DistillResult:
    """The outcome of :func:`distill`.

    Args:
        model: The distilled model (the start itself when no trial beat it on the hold-out set).
        steps: Optimiser steps of the kept state (0: the start was kept).
        teacher: Its teacher (None when the start was kept).
        lr: Its learning rate (None when the start was kept).
        temperature: Its temperature (None when the start was kept).
        augmentation: Its augmentation (None when the start was kept).
        holdout_before: Hold-out accuracy of the start.
        holdout_after: Hold-out accuracy of the kept state.
        seconds: Wall time.
        trials: Per trial: teacher, lr, temperature, augmentation, best step, best hold-out accuracy, steps run.
    """

    model: nn.Module
    steps: int
    teacher: str | None
    lr: float | None
    temperature: float | None
    augmentation: str | None
    holdout_before: float
    holdout_after: float
    seconds: float
    trials: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """A JSON-ready summary (without the model)."""
        return {"steps": self.steps, "teacher": self.teacher, "lr": self.lr, "temperature": self.temperature,
                "augmentation": self.augmentation, "holdout_before": self.holdout_before,
                "holdout_after": self.holdout_after, "seconds": self.seconds, "trials": self.trials}


def client_logits(model: nn.Module, batches: Iterable[torch.Tensor], *,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``model``'s ``[N, C]`` logits on the calibration batches (float64 on the CPU; the model's
    device and mode are restored): :func:`fedcca.merging.selection.holdout_logits` over their concatenation."""
    return holdout_logits(model, torch.cat(list(batches)), device=device)


def distill(start: nn.Module, inputs: torch.Tensor, teacher: TeacherSum, holdout: tuple[torch.Tensor, torch.Tensor],
            config: DistillConfig | None = None, *, device: torch.device | str | None = None) -> DistillResult:
    """Train a copy of ``start`` toward the teacher on ``inputs``; keep the state best on ``holdout``.

    Args:
        start: The merged model (not modified).
        inputs: The public calibration images ``[N, ...]`` the teacher's outputs were computed on.
        teacher: The clients' summed outputs on ``inputs``.
        holdout: Labelled public ``(inputs, labels)``, disjoint from ``inputs``; read only to
            choose steps and hyper-parameters.
        config: Steps and grids (default :class:`DistillConfig`).
        device: Where to train (None: CUDA if available).

    Raises:
        ValueError: Teacher targets that do not match ``inputs``.
    """
    config = DistillConfig() if config is None else config
    device = resolve_device(device)
    started = time.perf_counter()
    x = inputs.to(device)
    hx, hy = holdout[0].to(device), torch.as_tensor(holdout[1]).long().to(device)
    before = _accuracy(start, hx, hy, device)
    best_model, best_acc, best = start, before, None
    trials = []
    for kind, lr, temperature, augmentation in itertools.product(config.teachers, config.lrs, config.temperatures,
                                                                 config.augmentations):
        targets = teacher.targets(kind, temperature).float().to(device)
        if targets.shape[0] != len(x):
            raise ValueError(f"distill: teacher targets for {targets.shape[0]} images, {len(x)} calibration images")
        model, acc, step, ran = _trial(start, x, targets, hx, hy, lr, temperature, augmentation, config, device)
        trials.append({"teacher": kind, "lr": lr, "temperature": temperature, "augmentation": augmentation,
                       "best_step": step, "holdout_accuracy": acc, "steps_run": ran})
        if acc > best_acc:
            best_model, best_acc, best = model, acc, (step, kind, lr, temperature, augmentation)
    if best is None:
        best_model = copy.deepcopy(start)
    step, kind, lr, temperature, augmentation = best if best is not None else (0, None, None, None, None)
    return DistillResult(best_model.cpu(), step, kind, lr, temperature, augmentation, before, best_acc,
                         time.perf_counter() - started, trials)


def _trial(start: nn.Module, x: torch.Tensor, targets: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, lr: float,
           temperature: float, augmentation: str, config: DistillConfig,
           device: torch.device) -> tuple[nn.Module, float, int, int]:
    """One (lr, temperature, augmentation): the best hold-out state, its accuracy and step, the steps run."""
    student = copy.deepcopy(start).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    best_state, best_acc, best_step, since = None, -1.0, 0, 0
    step = 0
    for step in range(1, config.steps + 1):
        index = torch.randint(0, len(x), (min(config.batch_size, len(x)),), generator=generator).to(device)
        batch = _augment(x[index], augmentation, generator)
        student.train()
        log_probs = F.log_softmax(student(batch) / temperature, dim=1)
        loss = F.kl_div(log_probs, targets[index], reduction="batchmean") * temperature ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.eval_every == 0 or step == config.steps:
            acc = _accuracy(student, hx, hy, device)
            if acc > best_acc:
                best_acc, best_step, since = acc, step, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                since += 1
                if since >= config.patience:
                    break
    assert best_state is not None
    student.load_state_dict(best_state)
    return student, best_acc, best_step, step


def _augment(batch: torch.Tensor, augmentation: str, generator: torch.Generator) -> torch.Tensor:
    """The batch as it is, or shifted by one random (dy, dx) in [-2, 2]^2 (zero padding), whole batch at once."""
    if augmentation == "none" or batch.dim() != 4:
        return batch
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    shifted = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
    if dy > 0:
        shifted[:, :, :dy] = 0
    elif dy < 0:
        shifted[:, :, dy:] = 0
    if dx > 0:
        shifted[:, :, :, :dx] = 0
    elif dx < 0:
        shifted[:, :, :, dx:] = 0
    return shifted


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 512) -> float:
    """Hold-out accuracy; the model's device and mode are restored."""
    correct = 0
    with running_on(model, device, training=False), torch.no_grad():
        for start in range(0, len(x), batch_size):
            correct += (model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum().item()
    return correct / len(x)
