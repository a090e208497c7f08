"""Distillation teachers: what the clients' models say together about the public images.

Four teachers, all built from the clients' outputs on the calibration images:

- ``"probabilities"``: the average of the clients' softmax outputs, weighted like the merge.
  Under label skew a client's logits for labels it never saw carry no meaning, but its
  probabilities for them are near zero, so the average of probabilities stays a sensible
  ensemble (measured: CHANGELOG.md, 0.1.0).
- ``"logits"``: the average of the clients' logits, as FedDF (Lin et al., NeurIPS 2020) does.
- ``"label-counts"``: for each class ``y``, the clients' probabilities of ``y`` averaged with
  weights their numbers of training examples of ``y`` (their reported per-class counts,
  rescaled to their merge weights so a claim cannot outweigh the merge's cap), then normalised
  per image: a client asked about a class it never saw is not heard on it, and a class many
  clients hold does not outvote a rare one (the public images are class-balanced). Needs the clients' label counts (a privacy cost:
  the server learns every client's label histogram); a client that reports none is counted
  as holding its examples evenly over the classes (the aggregation logs it).
- ``"fitted"``: one non-negative weight per (client, class), fitted on the labelled public
  hold-out set to the clients' hold-out probabilities (penalised log-likelihood, the penalty
  chosen by cross-validation on the hold-out set only), applied like ``"label-counts"``.

The first three are running sums (memory ``N x C`` per teacher and temperature, whatever the
number of clients); ``"fitted"`` keeps every client's outputs until it is fitted (memory
``K x (N + H) x C``). Adding clients in any order gives the same teacher up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

TEACHERS: tuple[str, ...] = ("probabilities", "logits", "label-counts", "fitted")
FIT_PENALTIES: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
"""Penalties on the squared log-weights tried by the ``"fitted"`` teacher's cross-validation."""


class TeacherSum:
    """The clients' outputs on the calibration images, combined as each teacher asks.

    Args:
        teachers: Among :data:`TEACHERS`.
        temperatures: Temperatures the probabilities are kept at (the softmax does not
            commute with the average, so one sum per temperature).
        holdout_labels: Labels of the public hold-out set; needed by ``"fitted"`` (whose
            :meth:`add` then takes each client's hold-out logits too).
        folds: Cross-validation folds of the ``"fitted"`` teacher's penalty choice.
    """

    def __init__(self, teachers: Sequence[str], temperatures: Sequence[float],
                 holdout_labels: torch.Tensor | None = None, folds: int = 5) -> None:
        teachers = (teachers,) if isinstance(teachers, str) else tuple(teachers)
        if not teachers or any(t not in TEACHERS for t in teachers):
            raise ValueError(f"teachers must be among {TEACHERS}, got {teachers!r}")
        if "fitted" in teachers and holdout_labels is None:
            raise ValueError("the 'fitted' teacher is fitted on the labelled hold-out set: pass holdout_labels")
        self.teachers = teachers
        self.temperatures = tuple(float(t) for t in temperatures)
        self.holdout_labels = None if holdout_labels is None else torch.as_tensor(holdout_labels).long().cpu()
        self.folds = folds
        self.weight = 0.0
        self.missing_counts = 0
        self._sums: dict[tuple[str, float], torch.Tensor] = {}
        self._class_totals: torch.Tensor | None = None
        self._clients: list[tuple[torch.Tensor, torch.Tensor]] = []  # "fitted": (calibration, hold-out) logits
        self._fitted: torch.Tensor | None = None
        self.fit_report: dict | None = None

    @property
    def needs_label_counts(self) -> bool:
        """Whether :meth:`add` uses the clients' per-class example counts."""
        return "label-counts" in self.teachers

    @property
    def needs_holdout_logits(self) -> bool:
        """Whether :meth:`add` needs each client's logits on the hold-out images."""
        return "fitted" in self.teachers

    def add(self, logits: torch.Tensor, weight: float, *, label_counts: torch.Tensor | None = None,
            holdout_logits: torch.Tensor | None = None) -> None:
        """Add one client's ``[N, C]`` logits on the calibration images with its merge weight.

        Args:
            logits: The client's outputs on the calibration images.
            weight: Its merge weight.
            label_counts: Its ``[C]`` training examples per class (``"label-counts"``; None:
                counted as even over the classes, see :attr:`missing_counts`).
            holdout_logits: Its ``[H, C]`` outputs on the hold-out images (``"fitted"``).

        Raises:
            ValueError: Non-finite logits or counts, shapes that differ from the earlier clients', a bad weight.
        """
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"teacher: weight must be finite and >= 0, got {weight!r}")
        logits = _checked_logits(logits, "client outputs")
        classes = logits.shape[1]
        terms: dict[tuple[str, float], torch.Tensor] = {}
        votes = self._class_weights(label_counts, weight, classes) if self.needs_label_counts else None
        if "logits" in self.teachers:
            terms[("logits", 1.0)] = weight * logits
        for t in self.temperatures:
            probabilities = F.softmax(logits / t, dim=1)
            if "probabilities" in self.teachers:
                terms[("probabilities", t)] = weight * probabilities
            if votes is not None:
                terms[("label-counts", t)] = probabilities * votes
        if self.needs_holdout_logits:
            if holdout_logits is None:
                raise ValueError("teacher: the 'fitted' teacher needs the client's hold-out logits")
            holdout_logits = _checked_logits(holdout_logits, "client hold-out outputs")
            if holdout_logits.shape != (len(self.holdout_labels), classes):
                raise ValueError(f"teacher: hold-out outputs of shape {tuple(holdout_logits.shape)}, expected "
                                 f"({len(self.holdout_labels)}, {classes})")
        for key, term in terms.items():
            previous = self._sums.get(key)
            if previous is not None and previous.shape != term.shape:
                raise ValueError(f"teacher: client outputs of shape {tuple(term.shape)}, earlier ones "
                                 f"{tuple(previous.shape)}")
            self._sums[key] = term if previous is None else previous + term
        if self.needs_holdout_logits:
            self._clients.append((logits, holdout_logits))
            self._fitted = None
        self.weight += weight

    def _class_weights(self, label_counts: torch.Tensor | None, weight: float, classes: int) -> torch.Tensor:
        """The client's examples per class, rescaled to sum to its merge weight."""
        if label_counts is None:
            self.missing_counts += 1
            shares = torch.full((classes,), 1.0 / classes, dtype=torch.float64)
        else:
            counts = torch.as_tensor(label_counts, dtype=torch.float64).flatten()
            if counts.shape != (classes,) or not torch.isfinite(counts).all() or (counts < 0).any() \
                    or counts.sum() <= 0:
                raise ValueError(f"teacher: label counts must be {classes} finite non-negative numbers with a "
                                 f"positive sum, got {label_counts!r}")
            shares = counts / counts.sum()
        totals = weight * shares
        self._class_totals = totals if self._class_totals is None else self._class_totals + totals
        return totals[None, :]

    def targets(self, teacher: str, temperature: float) -> torch.Tensor:
        """The ``[N, C]`` probabilities of ``teacher`` at ``temperature``."""
        if self.weight <= 0:
            raise ValueError("teacher: no client outputs with a positive weight were added")
        if teacher == "logits":
            return F.softmax(self._sums[("logits", 1.0)] / self.weight / temperature, dim=1)
        if teacher == "probabilities":
            return self._sums[("probabilities", float(temperature))] / self.weight
        if teacher == "label-counts":  # per class, the clients' votes averaged by their examples of it
            assert self._class_totals is not None
            totals = self._class_totals.clamp_min(1e-300)[None, :]
            return _normalised(self._sums[("label-counts", float(temperature))] / totals)
        if teacher == "fitted":
            weights = self.fitted_weights()
            return combine([F.softmax(z / temperature, dim=1) for z, _ in self._clients], weights)
        raise ValueError(f"teacher: unknown teacher {teacher!r} (known: {self.teachers})")

    def fitted_weights(self) -> torch.Tensor:
        """The ``"fitted"`` teacher's ``[K, C]`` weights (fitted once, on the hold-out set)."""
        if not self._clients:
            raise ValueError("teacher: no client outputs were added")
        if self._fitted is None:
            assert self.holdout_labels is not None
            probabilities = torch.stack([F.softmax(h, dim=1) for _, h in self._clients])
            self._fitted, self.fit_report = fit_class_weights(probabilities, self.holdout_labels, folds=self.folds)
        return self._fitted


def combine(probabilities: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k, y] * probabilities[k][:, y]``, normalised per image."""
    score = sum(w[None, :] * p for p, w in zip(probabilities, weights))
    return _normalised(score)


def fit_class_weights(probabilities: torch.Tensor, labels: torch.Tensor, penalties: Sequence[float] = FIT_PENALTIES,
                      folds: int = 5, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Per-(client, class) weights ``exp(a)`` maximising the hold-out log-likelihood of :func:`combine`.

    The penalty ``lambda * mean(a^2)`` (which also fixes the weights' common scale) is chosen
    among ``penalties`` by ``folds``-fold cross-validation on these examples only; the weights
    are then refitted on all of them.

    Args:
        probabilities: ``[K, H, C]`` the clients' probabilities on the hold-out images.
        labels: ``[H]`` their labels.
        penalties: Penalties tried.
        folds: Cross-validation folds (at most ``H``).
        seed: Seeds the folds.

    Returns:
        The ``[K, C]`` weights and a report (cross-validated log-loss per penalty, the chosen one).
    """
    probabilities = probabilities.double()
    labels = torch.as_tensor(labels).long()
    if probabilities.dim() != 3 or probabilities.shape[1] != len(labels) or len(labels) < 2:
        raise ValueError(f"fit_class_weights: probabilities {tuple(probabilities.shape)} do not match "
                         f"{len(labels)} labels")
    folds = max(2, min(folds, len(labels)))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    losses = {}
    for penalty in penalties:
        total = 0.0
        for part in parts:
            train = torch.ones(len(labels), dtype=torch.bool)
            train[part] = False
            weights = _fit(probabilities[:, train], labels[train], penalty)
            total += float(_log_loss(probabilities[:, part], labels[part], weights.log())) * len(part)
        losses[penalty] = total / len(labels)
    chosen = min(losses, key=losses.__getitem__)
    weights = _fit(probabilities, labels, chosen)
    return weights.float(), {"penalty": chosen, "cv_log_loss": {str(k): v for k, v in losses.items()}}


def _fit(probabilities: torch.Tensor, labels: torch.Tensor, penalty: float, steps: int = 100) -> torch.Tensor:
    log_weights = torch.zeros(probabilities.shape[0], probabilities.shape[2], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_weights], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _log_loss(probabilities, labels, log_weights) + penalty * log_weights.pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_weights.detach().exp()


def _log_loss(probabilities: torch.Tensor, labels: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of :func:`combine` (in log space, so tiny probabilities stay finite)."""
    log_score = torch.logsumexp(log_weights[:, None, :] + probabilities.clamp_min(1e-300).log(), dim=0)
    return -(log_score.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(log_score, dim=1)).mean()


def _normalised(score: torch.Tensor) -> torch.Tensor:
    total = score.sum(1, keepdim=True)
    if not (total > 0).all():
        raise ValueError("teacher: an image on which every weighted client probability is zero")
    return score / total


def _checked_logits(logits: torch.Tensor, what: str) -> torch.Tensor:
    if logits.dim() != 2 or not torch.isfinite(logits).all():
        raise ValueError(f"teacher: {what} must be finite [N, C] logits, got shape {tuple(logits.shape)}")
    return logits.detach().double().cpu()
