"""Local training and evaluation loops shared by clients, server and benchmarks."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedcca.devices import resolve_device

WARMUP_FRACTION = 0.2  # share of the steps spent ramping the learning rate up
DEFAULT_MAX_GRAD_NORM = 5.0
"""Default gradient-norm clip of local training (chosen by ``simulations/stress.py``)."""


class BatchLoader(Iterable[tuple[torch.Tensor, torch.Tensor]], Sized, Protocol):
    """Anything with ``len()`` batches yielding ``(x, y)``: a DeviceLoader or a torch DataLoader."""


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


LR_SCHEDULES: tuple[str, ...] = ("constant", "one-cycle")


@dataclass(frozen=True)
class TrainingConfig:
    """How a model is trained locally (one client round, or a zoo model).

    Args:
        epochs: Passes over the loader.
        lr: Learning rate ("constant") or peak learning rate ("one-cycle").
        schedule: "constant", or "one-cycle": linear warm-up over the first 20% of the steps,
            then linear decay to 0 (:func:`lr_factor`).
        momentum: SGD momentum.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty applied to every parameter.
        proximal_mu: FedProx (Li et al., 2020): adds ``mu / 2 * ||w - w0||^2`` to the loss,
            ``w0`` the weights when training starts (the received global model).
        max_grad_norm: Clip each step's gradient to this global L2 norm (None: no clipping).
            On label-skewed shards the first steps from a model trained elsewhere can have
            gradients orders of magnitude above typical and diverge (docs/robustness.md).
        outlier_exposure: Weight of an outlier-exposure term (Hendrycks et al., ICLR 2019, with
            outliers made from the client's own images as FedOV, Diao et al., ICLR 2023, does):
            each batch's images with their patches shuffled (:func:`shuffled_patches`) are trained
            toward the uniform output, so the model answers "not mine" with a flat distribution
            where its own classes' shapes are absent. 0: off. Costs a second forward-backward pass
            of the batch per step.
    """

    epochs: int = 1
    lr: float = 0.05
    schedule: str = "one-cycle"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM
    outlier_exposure: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; choose one of {LR_SCHEDULES}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        for name in ("momentum", "weight_decay", "proximal_mu", "outlier_exposure"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (None: no clipping), got {self.max_grad_norm!r}")
        if self.nesterov and self.momentum == 0:
            object.__setattr__(self, "nesterov", False)  # torch refuses Nesterov without momentum

    def factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` at ``step`` of ``total_steps``."""
        return 1.0 if self.schedule == "constant" else lr_factor(step, total_steps)


def lr_factor(step: int, total_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """Multiplier of the peak learning rate at ``step`` of a one-cycle (triangular) schedule.

    Rises linearly from ``1 / (warmup_steps + 1)`` to 1 over the first ``warmup_fraction`` of
    the steps, then decays linearly to reach 0 after the last step.

    Args:
        step: Index of the optimisation step, ``0 <= step < total_steps``.
        total_steps: Number of steps of the whole run.
        warmup_fraction: Share of the steps used for the warm-up.
    """
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return (total_steps - step) / (total_steps - warmup)


def train(
    model: nn.Module,
    loader: BatchLoader,
    config: TrainingConfig,
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with SGD as ``config`` says.

    Args:
        model: Classifier producing logits; moved to ``device`` and left in train mode.
        loader: Batches ``(x, y)``, one pass per epoch (e.g. a shuffled ``DeviceLoader``).
        config: Epochs, learning rate and schedule, momentum, weight decay, proximal term.
        device: Where to train; ``None``: CUDA if available.

    Returns:
        ``{"loss": mean cross-entropy over all examples seen, "last_epoch_loss": the same over
        the last epoch, "seconds": wall time, "examples": examples processed, "steps": steps}``
        (the proximal term is not part of the reported loss).

    Raises:
        TrainingDivergedError: naming the epoch and step of the first non-finite loss.
    """
    device = resolve_device(device)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"nothing to train: epochs={config.epochs}, batches per epoch={steps_per_epoch}")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else None
    total_steps = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.factor(step, total_steps))
    start = time.perf_counter()
    loss_sum, examples, step, epoch_loss = 0.0, 0, 0, float("nan")
    for epoch in range(config.epochs):
        # Per-batch losses stay on the device (no sync per step); checked once per epoch.
        batch_losses, epoch_examples = [], 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            objective = loss if anchor is None else loss + _proximal(model, anchor, config.proximal_mu)
            if config.outlier_exposure > 0:
                objective = objective + config.outlier_exposure * uniform_loss(model(shuffled_patches(x)))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            batch_losses.append(loss.detach() * len(y))
            epoch_examples += len(y)
            step += 1
        epoch_total = torch.stack(batch_losses)
        _check_finite(epoch_total, epoch, step - len(batch_losses))
        epoch_loss = epoch_total.sum().item() / epoch_examples
        loss_sum += epoch_loss * epoch_examples
        examples += epoch_examples
    return {
        "loss": loss_sum / examples,
        "last_epoch_loss": epoch_loss,
        "seconds": time.perf_counter() - start,
        "examples": float(examples),
        "steps": float(step),
    }


OUTLIER_GRID = 4
"""Patches per image side of :func:`shuffled_patches` (7x7-pixel patches on 28x28 images)."""


def shuffled_patches(x: torch.Tensor, grid: int = OUTLIER_GRID) -> torch.Tensor:
    """The images ``x [N, C, H, W]`` cut into ``grid x grid`` patches, each image's patches in a random order.

    Local texture and the pixel statistics stay those of the client's data; the global shape of
    every class is destroyed. The whole batch is shuffled at once (one ``argsort`` and one ``gather``).

    Raises:
        ValueError: Not a batch of images, or ``H`` or ``W`` not a multiple of ``grid``.
    """
    if x.dim() != 4:
        raise ValueError(f"shuffled_patches: outlier exposure needs images [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"shuffled_patches: images of {h}x{w} pixels cannot be cut into {grid}x{grid} patches")
    ph, pw = h // grid, w // grid
    patches = x.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c * ph * pw)
    order = torch.rand(n, grid * grid, device=x.device).argsort(dim=1)
    patches = patches.gather(1, order[:, :, None].expand_as(patches))
    return patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean KL divergence from the uniform distribution over the ``C`` classes to ``softmax(logits [N, C])``
    (its cross-entropy to the uniform, less ``log C``: 0 for a flat output)."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean() - math.log(logits.shape[1])


def _proximal(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu / 2 * ||w - w0||^2`` over all parameters."""
    return 0.5 * mu * sum((p - p0).square().sum() for p, p0 in zip(model.parameters(), anchor))


def _check_finite(batch_losses: torch.Tensor, epoch: int, first_step: int) -> None:
    bad = (~torch.isfinite(batch_losses)).nonzero()
    if len(bad):
        index = int(bad[0])
        raise TrainingDivergedError(
            f"non-finite training loss at epoch {epoch}, step {first_step + index} of the run "
            f"(batch {index} of the epoch); lower the learning rate or check the data"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, *, device: torch.device | str | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over every batch of ``loader``.

    Runs in eval mode without gradients; the model's previous train/eval mode is restored.

    Args:
        model: Classifier producing logits; moved to ``device``.
        loader: Batches ``(x, y)``, typically ``DeviceLoader(shuffle=False, augment="none")``.
        device: Where to evaluate; ``None``: CUDA if available.

    Returns:
        ``(mean loss, accuracy as a fraction in [0, 1])``.
    """
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
            count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got a loader with no examples")
    return loss_sum.item() / count, correct.item() / count
