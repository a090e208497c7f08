"""Server-side distillation of a merged model toward the clients' ensemble on public data.

After a merge, the merged model (the *student*) is trained to match the clients' average
prediction (the *teacher*) on the unlabelled public calibration images, and early-stopped
on the labelled public hold-out set; nothing else is read (never test data). The teacher is
additive: every client adds its outputs on the calibration images to a running sum
(:class:`fedcca.merging.teachers.TeacherSum`, where the teachers are described).

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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fedcca.devices import resolve_device
from fedcca.merging.selection import holdout_logits
from fedcca.merging.teachers import TEACHERS, TeacherSum  # noqa: F401  (re-exported)
from fedcca.statistics import running_on

AUGMENTATIONS: tuple[str, ...] = ("none", "shift", "mixup")
MAX_COPIES = 32
SELECTIONS: tuple[str, ...] = ("accuracy", "loss")
"""What the hold-out set chooses a distilled state by (:attr:`DistillConfig.select`)."""
"""Most augmented copies per calibration image (:attr:`DistillConfig.copies`): each one costs every client's
forward pass and the teacher's memory as much as the calibration set."""


@dataclass(frozen=True)
class DistillConfig:
    """How the merged model is distilled toward the clients' ensemble.

    Args:
        teachers: Teachers to try, among :data:`fedcca.merging.teachers.TEACHERS`: "probabilities"
            (average of the clients' softmax outputs), "logits" (average of their logits: FedDF),
            "label-counts" (votes weighted by the clients' examples per class), "fitted"
            (per-client, per-class weights fitted on the hold-out set).
        steps: Most optimiser steps per trial.
        lrs: Adam learning rates to try.
        temperatures: Softmax temperatures to try (the loss is ``T^2 KL(teacher_T || student_T)``).
        augmentations: Batch augmentations to try: "none"; "shift" (random translations
            by up to 2 pixels, whole batch at once; the teacher's target is the unshifted image's);
            "mixup" (each image blended with another of the batch by a uniform weight, the
            teacher's targets blended by the same weight: many more transfer points from few images).
        copies: Augmented copies of each calibration image the teacher labels itself (every client's
            model runs on them as on the calibration images, so their targets are the teacher's own, not
            an approximation): a copy is a calibration image blended with another by a uniform weight and
            shifted by up to 2 pixels (:func:`transfer_images`); 0: the calibration images only.
        ema: Decays of an exponential moving average of the student's weights to try (0: the student
            itself): the average, not the last step's weights, is evaluated and kept (less noise from
            the few public images per step).
        select: What the hold-out set chooses the kept state by, among every trial's evaluated states
            and the start: "accuracy" (the most labels right) or "loss" (the lowest cross-entropy, a
            smoother measure on a few hundred images: fewer states kept for being lucky on a few of them).
        batch_size: Public images per step.
        eval_every: Steps between hold-out evaluations.
        patience: Evaluations without a hold-out improvement before a trial stops.
        seed: Seeds the batch order and augmentation.
    """

    teachers: tuple[str, ...] = ("probabilities", "logits", "fitted")
    steps: int = 2000
    lrs: tuple[float, ...] = (1e-3,)
    temperatures: tuple[float, ...] = (1.0,)
    augmentations: tuple[str, ...] = ("none",)
    copies: int = 0
    ema: tuple[float, ...] = (0.0,)
    select: str = "accuracy"
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
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or not 0 <= self.copies <= MAX_COPIES:
            raise ValueError(f"DistillConfig: copies must be an integer in [0, {MAX_COPIES}], got {self.copies!r}")
        ema = tuple(float(v) for v in ((self.ema,) if isinstance(self.ema, (int, float)) else self.ema))
        if not ema or not all(0 <= v < 1 for v in ema):
            raise ValueError(f"DistillConfig: ema decays must be in [0, 1), got {self.ema!r}")
        object.__setattr__(self, "ema", ema)
        if self.select not in SELECTIONS:
            raise ValueError(f"DistillConfig: select must be one of {SELECTIONS}, got {self.select!r}")
        augmentations = tuple(self.augmentations)
        if not augmentations or any(a not in AUGMENTATIONS for a in augmentations):
            raise ValueError(f"DistillConfig: augmentations must be among {AUGMENTATIONS}, got {self.augmentations!r}")
        object.__setattr__(self, "augmentations", augmentations)


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
        ema: Its moving-average decay, 0 for the student's own weights (None when the start was kept).
        holdout_before: Hold-out accuracy of the start.
        holdout_after: Hold-out accuracy of the kept state.
        seconds: Wall time.
        trials: Per trial: teacher, lr, temperature, augmentation, ema, the kept step with its hold-out accuracy
            and loss, steps run.
        teacher_fit: The "fitted" teacher's penalty choice (:func:`fedcca.merging.teachers.fit_class_weights`), if fitted.
    """

    model: nn.Module
    steps: int
    teacher: str | None
    lr: float | None
    temperature: float | None
    augmentation: str | None
    ema: float | None
    holdout_before: float
    holdout_after: float
    seconds: float
    trials: list[dict] = field(default_factory=list)
    teacher_fit: dict | None = None

    def to_json(self) -> dict:
        """A JSON-ready summary (without the model)."""
        return {"steps": self.steps, "teacher": self.teacher, "lr": self.lr, "temperature": self.temperature,
                "augmentation": self.augmentation, "ema": self.ema, "holdout_before": self.holdout_before,
                "holdout_after": self.holdout_after, "seconds": self.seconds, "trials": self.trials,
                "teacher_fit": self.teacher_fit}


def client_logits(model: nn.Module, batches: Iterable[torch.Tensor], *,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``model``'s ``[N, C]`` logits on the calibration batches (float64 on the CPU; the model's
    device and mode are restored): :func:`fedcca.merging.selection.holdout_logits` over their concatenation."""
    return holdout_logits(model, torch.cat(list(batches)), device=device)


def transfer_images(calibration: torch.Tensor, copies: int, seed: int = 0) -> torch.Tensor:
    """The images a teacher labels and a student is distilled on: the calibration images, then ``copies``
    augmented copies of them (``[(1 + copies) N, ...]``; the same for the same arguments).

    A copy blends each image with a random partner by a uniform weight, then (for ``[N, C, H, W]``
    images) shifts it by up to 2 pixels, the uncovered border zero: new points between and around
    the public images, on which the clients' models are asked, not extrapolated.
    """
    if copies == 0:
        return calibration
    generator = torch.Generator(device="cpu").manual_seed(seed)
    extra = []
    for _ in range(copies):
        partner = torch.randperm(len(calibration), generator=generator)
        weight = torch.rand(len(calibration), generator=generator, dtype=calibration.dtype)
        weight = weight.view(-1, *([1] * (calibration.dim() - 1)))
        blended = weight * calibration + (1 - weight) * calibration[partner]
        extra.append(_shifted(blended, generator) if blended.dim() == 4 else blended)
    return torch.cat([calibration, *extra])


def distill(start: nn.Module, inputs: torch.Tensor, teacher: TeacherSum, holdout: tuple[torch.Tensor, torch.Tensor],
            config: DistillConfig | None = None, *, device: torch.device | str | None = None) -> DistillResult:
    """Train a copy of ``start`` toward the teacher on ``inputs``; keep the state best on ``holdout``.

    Args:
        start: The merged model (not modified).
        inputs: The images the teacher's outputs were computed on (the calibration images, with
            :attr:`DistillConfig.copies`: :func:`transfer_images` of them).
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
    before = _holdout(start, hx, hy, device)
    best_model, best_holdout, best = start, before, None
    trials = []
    for kind, lr, temperature, augmentation, ema in itertools.product(
            config.teachers, config.lrs, config.temperatures, config.augmentations, config.ema):
        targets = teacher.targets(kind, temperature).float().to(device)
        if targets.shape[0] != len(x):
            raise ValueError(f"distill: teacher targets for {targets.shape[0]} images, {len(x)} calibration images")
        model, holdout, step, ran = _trial(start, x, targets, hx, hy, lr, temperature, augmentation, ema, config,
                                           device)
        trials.append({"teacher": kind, "lr": lr, "temperature": temperature, "augmentation": augmentation,
                       "ema": ema, "best_step": step, "holdout_accuracy": holdout[0], "holdout_loss": holdout[1],
                       "steps_run": ran})
        if _score(holdout, config.select) > _score(best_holdout, config.select):
            best_model, best_holdout, best = model, holdout, (step, kind, lr, temperature, augmentation, ema)
    if best is None:
        best_model = copy.deepcopy(start)
    step, kind, lr, temperature, augmentation, ema = best if best is not None else (0, None, None, None, None, None)
    return DistillResult(best_model.cpu(), step, kind, lr, temperature, augmentation, ema, before[0], best_holdout[0],
                         time.perf_counter() - started, trials, teacher.fit_report)


def _trial(start: nn.Module, x: torch.Tensor, targets: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, lr: float,
           temperature: float, augmentation: str, ema: float, config: DistillConfig,
           device: torch.device) -> tuple[nn.Module, tuple[float, float], int, int]:
    """One (lr, temperature, augmentation, ema): the best hold-out state, its hold-out (accuracy, loss) and step,
    the steps run."""
    student = copy.deepcopy(start).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    # the weights evaluated and kept: the student's own, or their moving average (buffers follow the student)
    kept = student if ema == 0 else AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema),
                                                 use_buffers=True)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    best_state, best_holdout, best_step, since = None, (-1.0, math.inf), 0, 0
    step = 0
    for step in range(1, config.steps + 1):
        index = torch.randint(0, len(x), (min(config.batch_size, len(x)),), generator=generator).to(device)
        batch, target = _augment(x[index], targets[index], augmentation, generator)
        student.train()
        log_probs = F.log_softmax(student(batch) / temperature, dim=1)
        loss = F.kl_div(log_probs, target, reduction="batchmean") * temperature ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if kept is not student:
            kept.update_parameters(student)
        if step % config.eval_every == 0 or step == config.steps:
            holdout = _holdout(_module(kept), hx, hy, device)
            if best_state is None or _score(holdout, config.select) > _score(best_holdout, config.select):
                best_holdout, best_step, since = holdout, step, 0
                best_state = {k: v.detach().clone() for k, v in _module(kept).state_dict().items()}
            else:
                since += 1
                if since >= config.patience:
                    break
    assert best_state is not None
    student.load_state_dict(best_state)
    return student, best_holdout, best_step, step


def _module(model: nn.Module) -> nn.Module:
    """The model an AveragedModel averages into (its ``module``), or ``model`` itself."""
    return model.module if isinstance(model, AveragedModel) else model


def _augment(batch: torch.Tensor, targets: torch.Tensor, augmentation: str,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch and its targets as they are, shifted, or mixed up; whole batch at once."""
    if augmentation == "mixup":
        # Blending targets linearly approximates the teacher on the blended image; the hold-out
        # choice against "none" decides whether the approximation pays.
        partner = torch.randperm(len(batch), generator=generator).to(batch.device)
        weight = torch.rand(len(batch), generator=generator, dtype=batch.dtype).to(batch.device)
        w = weight.view(-1, *([1] * (batch.dim() - 1)))
        return w * batch + (1 - w) * batch[partner], weight[:, None] * targets + (1 - weight[:, None]) * targets[partner]
    if augmentation == "none" or batch.dim() != 4:
        return batch, targets
    return _shifted(batch, generator), targets


def _shifted(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[N, C, H, W]`` images shifted together by up to 2 pixels each way, the uncovered border zero."""
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


def _holdout(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int = 512) -> tuple[float, float]:
    """Hold-out accuracy and mean cross-entropy; the model's device and mode are restored."""
    correct, loss = 0, 0.0
    with running_on(model, device, training=False), torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            labels = y[start:start + batch_size]
            correct += (logits.argmax(1) == labels).sum().item()
            loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
    return correct / len(x), loss / len(x)


def _score(holdout: tuple[float, float], select: str) -> float:
    """Higher is better: the hold-out accuracy, or the negated hold-out loss."""
    return holdout[0] if select == "accuracy" else -holdout[1]
