"""Keeping what the clients learned: the accuracy-aware choice, the round-1 reference, the
user's keywords reaching the search, and server-side distillation toward the clients' ensemble."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from torch import nn

import fedcca.merging.distillation
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import COMPUTE_STATS_FLAG
from fedcca.flower.strategy import FEDERATED_SEARCH, CCAMerge
from fedcca.merging.config import MergeConfig, MergeSearch, resolve_search
from fedcca.merging.distillation import TEACHERS, DistillConfig, TeacherSum, client_logits, distill
from fedcca.merging.merger import merge_with_result
from fedcca.merging.selection import calibrated_losses, choose, fit_temperature
from tests.tiny_clients import CALIBRATION, HELD_OUT, make_model, stats_app, teacher_labels, train_messages
from tests.tiny_models import CLASSES, calibration

NODES = (1, 2, 3)
HOLDOUT = (HELD_OUT, teacher_labels(HELD_OUT))


class _Fixed(nn.Module):
    """Returns stored logits for the inputs' row indices (inputs are ``[N, 1]`` indices)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_a_more_accurate_but_worse_calibrated_candidate_is_kept() -> None:
    """Baseline: 60% right, cautious (low loss). Candidate: 80% right, very overconfident when wrong
    (higher raw loss). Ranking by cross-entropy keeps the baseline; the choice keeps the candidate."""
    n, gen = 400, torch.Generator().manual_seed(0)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    wrong = (labels + 1) % CLASSES
    base_right = torch.rand(n, generator=gen) < 0.6
    cand_right = torch.rand(n, generator=gen) < 0.8
    base = torch.zeros(n, CLASSES)
    base[torch.arange(n), torch.where(base_right, labels, wrong)] = 1.0  # soft: loss ~ log(C) - 1
    cand = torch.zeros(n, CLASSES)
    cand[torch.arange(n), torch.where(cand_right, labels, wrong)] = 40.0  # hard: loss 40 when wrong
    models = [_Fixed(base), _Fixed(cand)]
    inputs = torch.arange(n).float()[:, None]
    configs = [MergeConfig("direct"), MergeConfig("cca")]
    index, scores = choose(models, configs, inputs, labels, min_z=2.0)
    assert scores[1].loss > scores[0].loss  # worse by raw cross-entropy ...
    assert scores[1].accuracy > scores[0].accuracy + 0.1
    assert index == 1 and scores[1].chosen and scores[1].z > 2.0  # ... kept for its accuracy
    assert scores[1].temperature > 5.0  # the overconfident candidate is cooled down
    kept, _ = choose(models, configs, inputs, labels, min_z=math.inf)
    assert kept == 0


def test_calibrated_losses_are_cross_fitted() -> None:
    """Each half's temperature comes from the other half: changing one example's logits moves only the
    other half's temperature (its own loss changes only through its own logits)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, CLASSES, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, CLASSES, (200,), generator=gen)
    losses = calibrated_losses(logits, labels)
    odd_t = fit_temperature(logits[1::2], labels[1::2])
    expected_even = torch.nn.functional.cross_entropy(logits[0::2] / odd_t, labels[0::2], reduction="none")
    torch.testing.assert_close(losses[0::2], expected_even)


def test_keywords_naming_a_grid_axis_replace_it() -> None:
    """The drift bug: CCAMerge(..., shrinkage=1.0, repair="affine") searched the whole default grid."""
    strategy = CCAMerge(make_model, CALIBRATION, holdout=HOLDOUT, shrinkage=1.0, repair="affine", device="cpu")
    labels = [c.label() for c in strategy.search.candidates()]
    assert labels == ["cca +affine", "permute +affine"]  # the method axis stays, the others are fixed
    only = CCAMerge(make_model, CALIBRATION, holdout=HOLDOUT, method="permute", shrinkage=1.0, repair="none",
                    device="cpu")
    assert [c.label() for c in only.search.candidates()] == ["permute"]
    search = resolve_search(FEDERATED_SEARCH, repair="affine")
    assert {c.repair for c in search.candidates()} == {"affine"}
    assert resolve_search("permute", repair="mean").candidates() == [MergeConfig("permute", repair="mean")]
    models = [make_model(seed=s) for s in (1, 2)]
    result = merge_with_result(models, CALIBRATION, MergeSearch(MergeConfig("cca"), (("shrinkage", (0.0, 1.0)),)),
                               shrinkage=1.0)  # no search left: no hold-out needed
    assert result.config.shrinkage == 1.0
    with pytest.raises(TypeError, match="unknown merge option"):
        resolve_search(None, shrinkag=1.0)


def test_the_default_search_holds_permute_and_no_duplicates() -> None:
    candidates = FEDERATED_SEARCH.candidates()
    labels = [c.label() for c in candidates]
    assert labels == ["direct", "direct +affine", "cca a=0.5", "cca a=0.5 +affine", "cca", "cca +affine",
                      "permute", "permute +affine"]  # no halfway permutation: (I + P) / 2 can be singular


def _trained_replies(compute_stats: bool) -> list[Message]:
    """Clients trained from an untrained global model (round 1 of one-shot FL)."""
    grid = InProcessGrid({node: stats_app for node in NODES})
    start = ArrayRecord(make_model(seed=1).state_dict())
    return list(grid.send_and_receive(train_messages(start, list(NODES), compute_stats=compute_stats)))


def test_round_one_does_not_align_to_the_random_global_model() -> None:
    """reference "auto": round 1 aligns to the medoid client without a hold-out set (server statistics; never
    chosen by claimed example counts), later rounds to the global model."""
    strategy = CCAMerge(make_model, CALIBRATION, MergeConfig("cca", zero_dead=False), device="cpu",
                        min_train_nodes=2)
    assert strategy.reference == "auto"
    grid = InProcessGrid({node: stats_app for node in NODES})
    start = ArrayRecord(make_model(seed=1).state_dict())
    first = list(strategy.configure_train(1, start, ConfigRecord(), grid))
    assert all(not msg.content["config"][COMPUTE_STATS_FLAG] for msg in first)  # statistics would not fit
    replies = list(grid.send_and_receive(first))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    record = strategy.rounds[-1]
    weights = {msg.metadata.src_node_id: torch.cat([v.double().reshape(-1) for v in
                                                     msg.content["arrays"].to_torch_state_dict().values()
                                                     if v.is_floating_point()]) for msg in replies}
    total = {node: sum(float((w - other).norm()) for other in weights.values()) for node, w in weights.items()}
    assert record.reference == min(total, key=total.get) and record.client_statistics == 0
    second = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    assert all(msg.content["config"][COMPUTE_STATS_FLAG] for msg in second)
    strategy.aggregate_train(2, list(grid.send_and_receive(second)))
    assert strategy.rounds[-1].reference == "global" and strategy.rounds[-1].client_statistics == len(NODES)


def test_streamed_teacher_equals_the_batch_computation() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(30, CLASSES, generator=gen, dtype=torch.float64) * 4 for _ in range(5)]
    weights = [3.0, 1.0, 0.5, 2.0, 7.0]
    total = sum(weights)
    for teacher, temperature in (("probabilities", 1.0), ("probabilities", 3.0), ("logits", 2.0)):
        streamed = TeacherSum(("probabilities", "logits"), (1.0, 3.0))
        for z, w in zip(logits, weights):
            streamed.add(z, w)
        if teacher == "probabilities":
            expected = sum(w * torch.softmax(z / temperature, 1) for z, w in zip(logits, weights)) / total
        else:
            expected = torch.softmax(sum(w * z for z, w in zip(logits, weights)) / total / temperature, 1)
        torch.testing.assert_close(streamed.targets(teacher, temperature), expected)
    with pytest.raises(ValueError, match="finite"):
        TeacherSum(("logits",), (1.0,)).add(torch.full((3, CLASSES), math.nan), 1.0)


def test_distillation_reads_only_calibration_and_holdout_and_never_gets_worse_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    teacher_model, student = make_model(seed=5), make_model(seed=6)
    x = calibration(64, seed=4)
    teacher = TeacherSum(("probabilities",), (1.0,))
    teacher.add(client_logits(teacher_model, [x], device="cpu"), 1.0)
    seen: list[torch.Tensor] = []
    holdout = fedcca.merging.distillation._holdout

    def spy(model, inputs, labels, device, batch_size=512):  # noqa: ANN001, ANN202
        seen.append(inputs)
        return holdout(model, inputs, labels, device, batch_size)

    monkeypatch.setattr(fedcca.merging.distillation, "_holdout", spy)
    labels = teacher_labels(HELD_OUT)
    result = distill(student, x, teacher, (HELD_OUT, labels),
                     DistillConfig(teachers=("probabilities",), steps=60, eval_every=20, batch_size=16), device="cpu")
    assert all(torch.equal(inputs, HELD_OUT) for inputs in seen) and len(seen) >= 2
    assert result.holdout_after >= result.holdout_before
    assert result.holdout_after > result.holdout_before  # toward the labels' own teacher: it learns
    assert result.steps > 0 and result.lr == 1e-3
    assert result.ema == 0.0 and result.to_json()["ema"] == 0.0  # the student's own weights, the default


@pytest.mark.parametrize("select", ["accuracy", "loss"])
def test_distillation_keeps_the_state_best_by_the_chosen_measure(select: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every state evaluated on the hold-out set (the start, each trial's checkpoints) competes; the one kept
    has the highest accuracy, or the lowest cross-entropy, of them all."""
    teacher_model, student = make_model(seed=5), make_model(seed=6)
    x = calibration(64, seed=4)
    teacher = TeacherSum(("probabilities", "logits"), (1.0, 1.0))
    teacher.add(client_logits(teacher_model, [x], device="cpu"), 1.0)
    measured: list[tuple[float, float]] = []
    holdout = fedcca.merging.distillation._holdout

    def spy(model, inputs, labels, device, batch_size=512):  # noqa: ANN001, ANN202
        measured.append(holdout(model, inputs, labels, device, batch_size))
        return measured[-1]

    monkeypatch.setattr(fedcca.merging.distillation, "_holdout", spy)
    labels = teacher_labels(HELD_OUT)
    result = distill(student, x, teacher, (HELD_OUT, labels),
                     DistillConfig(teachers=("probabilities", "logits"), lrs=(1e-3, 3e-3), steps=80, eval_every=20,
                                   batch_size=16, select=select), device="cpu")
    monkeypatch.setattr(fedcca.merging.distillation, "_holdout", holdout)
    kept = holdout(result.model, HELD_OUT, labels, torch.device("cpu"))
    assert len(measured) > 5 and result.holdout_after == kept[0]
    if select == "accuracy":
        assert kept[0] == max(a for a, _ in measured)
    else:
        assert kept[1] == pytest.approx(min(loss for _, loss in measured), rel=1e-6)
    assert all("holdout_loss" in trial for trial in result.trials)
    with pytest.raises(ValueError, match="select"):
        DistillConfig(select="f1")


def _feddf_strategy(teacher: str) -> CCAMerge:
    return CCAMerge(make_model, CALIBRATION, "direct", holdout=HOLDOUT, device="cpu", min_train_nodes=2,
                    distill=DistillConfig(teachers=(teacher,), steps=40, eval_every=20, batch_size=16))


@pytest.mark.parametrize("teacher", ["logits", "probabilities"])
def test_feddf_matches_its_definition(monkeypatch: pytest.MonkeyPatch, teacher: str) -> None:
    """FedDF = FedAvg's average as the student, the clients' weighted (logit or probability) average as the teacher."""
    replies = _trained_replies(compute_stats=False)
    captured: dict = {}
    real = fedcca.flower.strategy.distill

    def spy(start, inputs, teacher_sum, holdout, config, device=None):  # noqa: ANN001, ANN202
        captured.update(start=start, inputs=inputs, teacher=teacher_sum, holdout=holdout)
        return real(start, inputs, teacher_sum, holdout, config, device=device)

    monkeypatch.setattr(fedcca.flower.strategy, "distill", spy)
    strategy = _feddf_strategy(teacher)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.rounds[-1].distillation is not None
    plain = CCAMerge(make_model, CALIBRATION, "direct", device="cpu", min_train_nodes=2).aggregate_train(1, replies)[0]
    for key, value in plain.to_torch_state_dict().items():
        torch.testing.assert_close(captured["start"].state_dict()[key], value, msg=key)
    assert torch.equal(captured["inputs"], CALIBRATION) and captured["holdout"][0] is HOLDOUT[0]
    models, weights = [], []
    for msg in replies:
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        models.append(model.eval())
        weights.append(float(msg.content["metrics"]["num-examples"]))
    weights = [min(w, 2 * statistics.median(weights)) for w in weights]  # the merge's weights: capped at 2 median claims
    with torch.no_grad():
        outputs = [m(CALIBRATION).double() for m in models]
    total = sum(weights)
    if teacher == "logits":
        expected = torch.softmax(sum(w * z for z, w in zip(outputs, weights)) / total, 1)
    else:
        expected = sum(w * torch.softmax(z, 1) for z, w in zip(outputs, weights)) / total
    torch.testing.assert_close(captured["teacher"].targets(teacher, 1.0), expected)
    assert strategy.rounds[-1].distillation["trials"][0]["teacher"] == teacher


def test_distillation_needs_held_out_data() -> None:
    with pytest.raises(ValueError, match="early-stopped"):
        CCAMerge(make_model, CALIBRATION, "direct", distill=DistillConfig())
    with pytest.raises(ValueError, match="teachers"):
        DistillConfig(teachers=("soft",))


def test_holdout_as_a_dataloader_or_dataset_equals_the_tensors() -> None:
    from torch.utils.data import DataLoader, TensorDataset  # pylint: disable=import-outside-toplevel

    dataset = TensorDataset(*HOLDOUT)
    for holdout in (DataLoader(dataset, batch_size=7), dataset):
        strategy = CCAMerge(make_model, CALIBRATION, holdout=holdout, device="cpu")
        inputs, labels = strategy.settings.holdout
        assert torch.equal(inputs, HOLDOUT[0]) and torch.equal(labels, HOLDOUT[1])
    labelled = TensorDataset(CALIBRATION, torch.zeros(len(CALIBRATION), dtype=torch.long))
    for calibration in (DataLoader(labelled, batch_size=16), labelled):  # calibration too: the inputs, in order
        strategy = CCAMerge(make_model, calibration, device="cpu")
        assert torch.equal(torch.cat(strategy.settings.calibration), CALIBRATION)


def test_construction_errors_name_what_to_fix() -> None:
    with pytest.raises(TypeError, match="not a model instance"):
        CCAMerge(make_model(), CALIBRATION)
    bad = CALIBRATION.clone()
    bad[3, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="calibration batch 0 has non-finite"):
        CCAMerge(make_model, bad)
    with pytest.raises(ValueError, match="holdout inputs must be finite"):
        CCAMerge(make_model, CALIBRATION, holdout=(bad[:10], HOLDOUT[1][:10]))


def test_mixup_blends_each_image_and_its_target_by_the_same_weight() -> None:
    values = torch.linspace(0.0, 1.0, 16, dtype=torch.float32)
    batch = values.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()  # image i is the constant values[i]
    targets = torch.stack([values, 1 - values], dim=1)  # a teacher linear in the image
    mixed, mixed_targets = fedcca.merging.distillation._augment(batch, targets, "mixup",
                                                                 torch.Generator().manual_seed(0))
    assert not torch.equal(mixed, batch)
    torch.testing.assert_close(mixed_targets[:, 0], mixed[:, 0, 0, 0])
    torch.testing.assert_close(mixed_targets.sum(1), torch.ones(16))
    assert torch.all(mixed == mixed[:, :, :1, :1])  # whole images blended, not pixels


def test_the_moving_average_of_the_student_is_what_is_evaluated_and_kept() -> None:
    """With ``ema = d`` the kept weights after two steps are ``d w_1 + (1 - d) w_2`` of the plain run's steps."""
    from fedcca.merging.distillation import _trial
    teacher_model, student = make_model(seed=5), make_model(seed=6)
    x = calibration(64, seed=4)
    teacher = TeacherSum(("probabilities",), (1.0,))
    teacher.add(client_logits(teacher_model, [x], device="cpu"), 1.0)
    targets = teacher.targets("probabilities", 1.0).float()
    hx, hy = HELD_OUT, teacher_labels(HELD_OUT)

    def run(steps: int, ema: float) -> dict[str, torch.Tensor]:
        config = DistillConfig(steps=steps, eval_every=steps, batch_size=16, lrs=(0.01,), ema=ema)
        model, _, step, ran = _trial(student, x, targets, hx, hy, 0.01, 1.0, "none", ema, config, torch.device("cpu"))
        assert step == ran == steps
        return model.state_dict()

    first, second, averaged = run(1, 0.0), run(2, 0.0), run(2, 0.75)
    floats = [key for key, value in averaged.items() if value.is_floating_point()]  # BatchNorm's step counter aside
    assert any(not torch.equal(first[key], second[key]) for key in floats)
    for key in floats:  # weights and BatchNorm statistics alike
        torch.testing.assert_close(averaged[key], 0.75 * first[key] + 0.25 * second[key], msg=key)
    with pytest.raises(ValueError, match="ema decays must be in"):
        DistillConfig(ema=(1.0,))
