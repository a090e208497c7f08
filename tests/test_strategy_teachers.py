"""Distillation teachers that know where each client is competent: label-count votes and
per-client, per-class weights fitted on the hold-out set."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import LABEL_COUNTS_FLAG, LABEL_COUNTS_KEY
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.distillation import DistillConfig
from fedcca.merging.teachers import FIT_PENALTIES, TeacherSum, combine, fit_class_weights
from tests.tiny_clients import CALIBRATION, HELD_OUT, make_model, stats_app, teacher_labels, train_messages
from tests.tiny_models import CLASSES

NODES = (1, 2, 3)
HOLDOUT = (HELD_OUT, teacher_labels(HELD_OUT))


def test_label_count_teacher_is_its_definition_in_any_order() -> None:
    """score(y | x) = sum_k v_k(y) p_k(y | x) / sum_k v_k(y) with v_k = w_k n_k / sum(n_k), normalised per image."""
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(20, CLASSES, generator=gen, dtype=torch.float64) * 3 for _ in range(3)]
    counts = [torch.randint(0, 9, (CLASSES,), generator=gen).double() + (k == 0) for k in range(3)]
    counts[1][0] = 0.0
    weights = [2.0, 1.0, 5.0]
    for temperature in (1.0, 2.0):
        votes = [w * n / n.sum() for n, w in zip(counts, weights)]
        score = sum(v[None, :] * torch.softmax(z / temperature, 1) for z, v in zip(logits, votes)) / sum(votes)
        expected = score / score.sum(1, keepdim=True)
        for order in ((0, 1, 2), (2, 0, 1)):
            teacher = TeacherSum(("label-counts",), (1.0, 2.0))
            for k in order:
                teacher.add(logits[k], weights[k], label_counts=counts[k])
            torch.testing.assert_close(teacher.targets("label-counts", temperature), expected)


def test_label_counts_missing_count_as_even_and_malformed_raise() -> None:
    z = torch.randn(5, CLASSES, dtype=torch.float64)
    teacher = TeacherSum(("label-counts",), (1.0,))
    teacher.add(z, 1.0)
    assert teacher.missing_counts == 1
    torch.testing.assert_close(teacher.targets("label-counts", 1.0), torch.softmax(z, 1))
    for bad in (torch.ones(CLASSES + 1), -torch.ones(CLASSES), torch.zeros(CLASSES),
                torch.full((CLASSES,), float("nan"))):
        with pytest.raises(ValueError, match="label counts"):
            teacher.add(z, 1.0, label_counts=bad)


def _specialists(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clients on 3 classes: A knows 0 and 1 (unsure between them) and is unsure on 2; B
    knows 2 and calls every image a "2", confidently (label skew's confident stranger).
    ``[2, n, 3]`` probabilities and the labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    own = labels < 2
    a, b = torch.full((n, 3), 0.02, dtype=torch.float64), torch.full((n, 3), 0.02, dtype=torch.float64)
    a[own, labels[own]], a[own, 1 - labels[own]] = 0.6, 0.38
    a[~own] = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    confidence = 0.7 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)
    b[:, 2] = torch.where(own, confidence, torch.full_like(confidence, 0.96))
    return torch.stack([a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)]), labels


def test_fitted_weights_learn_who_knows_which_class() -> None:
    """Fitted on one sample, judged on another: the weights undo B's confident votes outside class 2."""
    fit, labels = _specialists(300, seed=1)
    weights, report = fit_class_weights(fit, labels)
    assert report["penalty"] in FIT_PENALTIES and set(report["cv_log_loss"]) == {str(p) for p in FIT_PENALTIES}
    test, test_labels = _specialists(1000, seed=2)
    average = test.mean(0).argmax(1)
    fitted = combine(list(test), weights).argmax(1)
    assert (average == test_labels).double().mean() < 0.5  # B outvotes A on classes 0 and 1
    assert (fitted == test_labels).double().mean() > 0.95
    assert weights[0, 0] > weights[1, 0] and weights[0, 1] > weights[1, 1]


def test_fitted_teacher_needs_hold_out_labels_and_logits() -> None:
    with pytest.raises(ValueError, match="hold-out"):
        TeacherSum(("fitted",), (1.0,))
    teacher = TeacherSum(("fitted",), (1.0,), holdout_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="hold-out logits"):
        teacher.add(torch.zeros(3, CLASSES), 1.0)
    with pytest.raises(ValueError, match="shape"):
        teacher.add(torch.zeros(3, CLASSES), 1.0, holdout_logits=torch.zeros(5, CLASSES))


def _replies_with_counts(strategy: CCAMerge, counts: dict[int, list[int] | None]) -> list[Message]:
    grid = InProcessGrid({node: stats_app for node in NODES})
    start = ArrayRecord(make_model(seed=1).state_dict())
    messages = list(strategy.configure_train(1, start, ConfigRecord(), grid))
    assert all(msg.content["config"][LABEL_COUNTS_FLAG] for msg in messages)
    replies = list(grid.send_and_receive(train_messages(start, list(NODES), compute_stats=False)))
    for reply in replies:
        value = counts[reply.metadata.src_node_id]
        if value is not None:
            reply.content["metrics"][LABEL_COUNTS_KEY] = value
    return replies


def test_the_strategy_asks_for_label_counts_and_teaches_with_them(caplog: pytest.LogCaptureFixture) -> None:
    config = DistillConfig(teachers=("label-counts", "fitted"), steps=40, eval_every=20, batch_size=16)
    strategy = CCAMerge(make_model, CALIBRATION, "direct", holdout=HOLDOUT, device="cpu", min_train_nodes=2,
                        distill=config)
    counts = {1: [5] + [0] * (CLASSES - 1), 2: [1] * CLASSES, 3: None}
    captured: dict = {}
    real = TeacherSum.add

    def spy(self, logits, weight, **kwargs):  # noqa: ANN001, ANN202
        captured.setdefault("adds", []).append((kwargs.get("label_counts"), kwargs.get("holdout_logits")))
        return real(self, logits, weight, **kwargs)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(TeacherSum, "add", spy)
        replies = _replies_with_counts(strategy, counts)
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    received = [c for c, _ in captured["adds"]]
    assert sum(c is None for c in received) == 1  # node 3 sent no counts
    assert sorted(tuple(c.tolist()) for c in received if c is not None) == sorted(
        tuple(float(v) for v in counts[n]) for n in (1, 2))
    assert all(h is not None and h.shape == (len(HELD_OUT), CLASSES) for _, h in captured["adds"])
    assert "sent no 'label-counts'" in caplog.text
    distillation = strategy.rounds[-1].distillation
    assert distillation["teacher_fit"]["penalty"] in FIT_PENALTIES
    assert {trial["teacher"] for trial in distillation["trials"]} == {"label-counts", "fitted"}


def test_no_label_counts_asked_without_that_teacher() -> None:
    strategy = CCAMerge(make_model, CALIBRATION, "direct", holdout=HOLDOUT, device="cpu", min_train_nodes=2,
                        distill=DistillConfig(teachers=("fitted",), steps=20, eval_every=20))
    grid = InProcessGrid({node: stats_app for node in NODES})
    messages = strategy.configure_train(1, ArrayRecord(make_model(seed=1).state_dict()), ConfigRecord(), grid)
    assert not any(msg.content["config"][LABEL_COUNTS_FLAG] for msg in messages)


def test_transfer_images_are_the_calibration_images_then_seeded_augmented_copies() -> None:
    from fedcca.merging.distillation import transfer_images
    images = CALIBRATION
    assert transfer_images(images, 0) is images
    made = transfer_images(images, 3, seed=5)
    assert made.shape == (4 * len(images), *images.shape[1:])
    assert torch.equal(made[:len(images)], images)
    assert torch.equal(made, transfer_images(images, 3, seed=5))  # the same for the same arguments
    assert not torch.equal(made, transfer_images(images, 3, seed=6))
    copies = made[len(images):].reshape(3, *images.shape)
    assert all(not torch.equal(copy, images) for copy in copies)
    with pytest.raises(ValueError, match="copies must be an integer in"):
        DistillConfig(copies=-1)


def test_with_copies_every_client_labels_them_and_the_teacher_is_their_average_there() -> None:
    """The teacher's targets on the augmented copies are the clients' own outputs there (weighted average of
    probabilities, as on the calibration images), not the calibration images' targets carried over."""
    from fedcca.merging.distillation import transfer_images
    config = DistillConfig(teachers=("probabilities",), copies=2, steps=20, eval_every=10, batch_size=16)
    strategy = CCAMerge(make_model, CALIBRATION, "direct", holdout=HOLDOUT, device="cpu", min_train_nodes=2,
                        distill=config)
    grid = InProcessGrid({node: stats_app for node in NODES})
    start = ArrayRecord(make_model(seed=1).state_dict())
    strategy.configure_train(1, start, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(train_messages(start, list(NODES), compute_stats=False)))
    seen: dict = {}
    real = TeacherSum.targets

    def spy(self, kind, temperature):  # noqa: ANN001, ANN202
        seen["targets"] = real(self, kind, temperature)
        return seen["targets"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TeacherSum, "targets", spy)
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    images = transfer_images(CALIBRATION, 2, config.seed)
    models, weights = [], []
    for reply in replies:
        model = make_model()
        model.load_state_dict(reply.content["arrays"].to_torch_state_dict())
        models.append(model.eval())
        weights.append(float(reply.content["metrics"]["num-examples"]))
    with torch.no_grad():
        expected = sum(w * torch.softmax(m(images), dim=1) for m, w in zip(models, weights)) / sum(weights)
    assert seen["targets"].shape == (3 * len(CALIBRATION), CLASSES)
    torch.testing.assert_close(seen["targets"].float(), expected.float(), rtol=1e-4, atol=1e-5)
