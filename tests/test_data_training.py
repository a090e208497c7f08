"""train / evaluate loops on a tiny model and a linearly separable toy problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcca.data import DeviceLoader
from fedcca.training import TrainingConfig, TrainingDivergedError, evaluate, lr_factor, train


def toy_loader(n: int = 256, shuffle: bool = True, seed: int = 0) -> DeviceLoader:
    """Two classes: bright vs dark 4x4 images."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    base = torch.where(labels.view(-1, 1, 1, 1) == 1, 170, 60)
    noise = torch.randint(-50, 51, (n, 1, 4, 4), generator=gen)
    return DeviceLoader((base + noise).to(torch.uint8), labels, 32, shuffle=shuffle, mean=(0.5,), std=(0.25,), device="cpu")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))


def test_train_learns_and_reports() -> None:
    model, data = tiny_model(), toy_loader()
    loss_before, acc_before = evaluate(model, toy_loader(shuffle=False), device="cpu")
    result = train(model, data, TrainingConfig(epochs=3, lr=0.1), device="cpu")
    loss_after, acc_after = evaluate(model, toy_loader(shuffle=False), device="cpu")
    assert result["examples"] == 3 * 256 and result["steps"] == 3 * 8 and result["seconds"] > 0
    assert result["last_epoch_loss"] < result["loss"] < loss_before
    assert loss_after < loss_before and acc_after > 0.95 and acc_after >= acc_before


def test_train_is_deterministic() -> None:
    a, b = tiny_model(), tiny_model()
    train(a, toy_loader(seed=1), TrainingConfig(epochs=2), device="cpu")
    train(b, toy_loader(seed=1), TrainingConfig(epochs=2), device="cpu")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_evaluate_matches_manual_computation_and_restores_mode() -> None:
    model, data = tiny_model(), toy_loader(n=100, shuffle=False)
    model.train()
    loss, accuracy = evaluate(model, data, device="cpu")
    x = torch.cat([xb for xb, _ in data])
    y = torch.cat([yb for _, yb in data])
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert model.training


def test_evaluate_uses_eval_mode_and_no_grad() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_grad_enabled()))
            return x.flatten(1)[:, :2]

    evaluate(Probe(), toy_loader(n=40, shuffle=False), device="cpu")
    assert seen and all(mode == (False, False) for mode in seen)


def test_non_finite_loss_names_epoch_and_step() -> None:
    model = tiny_model()
    with pytest.raises(TrainingDivergedError, match=r"epoch 0, step 1 of the run"):
        train(model, toy_loader(), TrainingConfig(epochs=2, lr=float("nan")), device="cpu")  # step 0 finite, then NaN
    with torch.no_grad():
        model[1].weight.fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match="epoch 0, step 0"):
        train(model, toy_loader(), TrainingConfig(epochs=1), device="cpu")


def test_lr_schedule_one_cycle() -> None:
    factors = [lr_factor(s, 100) for s in range(100)]
    peak = factors.index(max(factors))
    assert max(factors) == 1.0 and peak == 20
    assert all(a < b for a, b in zip(factors[:peak], factors[1 : peak + 1]))  # rising
    assert all(a > b for a, b in zip(factors[peak:], factors[peak + 1 :]))  # then falling
    assert 0 < factors[-1] <= 0.02 and lr_factor(0, 1) == 1.0


def test_empty_training_rejected() -> None:
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        TrainingConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine'"):
        TrainingConfig(schedule="cosine")


def test_constant_schedule_is_plain_sgd_with_momentum() -> None:
    """niid_bench's optimiser: one torch.optim.SGD step per batch at a fixed learning rate."""
    model, reference, data = tiny_model(), tiny_model(), toy_loader(seed=3)
    train(model, data, TrainingConfig(epochs=1, lr=0.05, schedule="constant", momentum=0.9, nesterov=False,
                                      weight_decay=1e-5), device="cpu")
    optimiser = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    for x, y in toy_loader(seed=3):
        optimiser.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimiser.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_proximal_term_pulls_towards_the_starting_weights() -> None:
    """FedProx: the gradient of mu/2 ||w - w0||^2 is mu (w - w0); a large mu keeps w near w0."""
    start = tiny_model()
    free, held = tiny_model(), tiny_model()
    config = TrainingConfig(epochs=3, lr=0.1, schedule="constant", weight_decay=0.0)
    train(free, toy_loader(), config, device="cpu")
    train(held, toy_loader(), TrainingConfig(epochs=3, lr=0.1, schedule="constant", weight_decay=0.0,
                                             proximal_mu=5.0), device="cpu")

    def distance(model: nn.Module) -> float:
        return sum((p - q).square().sum() for p, q in zip(model.parameters(), start.parameters())).sqrt().item()

    assert distance(held) < 0.5 * distance(free)


def test_gradient_clipping_bounds_every_step() -> None:
    """max_grad_norm: each plain SGD step moves the weights by at most lr * max_grad_norm, and equals the step
    on the clipped gradient computed by hand."""
    model, reference = tiny_model(), tiny_model()
    reference.load_state_dict(model.state_dict())
    x, y = next(iter(toy_loader(seed=4)))
    config = TrainingConfig(epochs=1, lr=0.5, schedule="constant", momentum=0.0, weight_decay=0.0,
                            max_grad_norm=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, [(x, y)], config, device="cpu")  # type: ignore[arg-type]
    nn.functional.cross_entropy(reference(x), y).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    assert norm > 1e-3  # the clip is active
    step = torch.sqrt(sum((p - q).square().sum() for p, q in zip(model.parameters(), before)))
    assert step <= 0.5 * 1e-3 * (1 + 1e-4)
    for p, q, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), q - 0.5 * g * (1e-3 / (norm + 1e-6)))
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        TrainingConfig(max_grad_norm=0.0)


def test_shuffled_patches_reorders_whole_patches_per_image() -> None:
    """Every image keeps its own patches, each intact, in a new order; odd sizes are refused."""
    from fedcca.training import shuffled_patches

    torch.manual_seed(0)
    x = torch.randn(6, 2, 8, 8)
    y = shuffled_patches(x, grid=4)

    def patches(images: torch.Tensor) -> torch.Tensor:  # [N, 16, C*2*2]
        return images.reshape(6, 2, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(6, 16, 8)

    px, py = patches(x), patches(y)
    moved = 0
    for i in range(6):
        match = (py[i][:, None, :] == px[i][None, :, :]).all(-1)  # [16 out, 16 in]
        assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()  # a permutation of its own patches
        moved += int((match.float().argmax(1) != torch.arange(16)).any())
    assert moved == 6
    with pytest.raises(ValueError, match="10x8 pixels"):
        shuffled_patches(torch.zeros(1, 1, 10, 8), grid=4)


def test_uniform_loss_is_zero_for_a_flat_output_only() -> None:
    from fedcca.training import uniform_loss

    assert abs(uniform_loss(torch.full((3, 10), 2.5)).item()) < 1e-6
    peaked = torch.zeros(3, 10)
    peaked[:, 0] = 4.0
    expected = (torch.log_softmax(peaked, 1).mean(1).neg() - torch.log(torch.tensor(10.0))).mean()
    torch.testing.assert_close(uniform_loss(peaked), expected)
    assert uniform_loss(peaked).item() > 0.5


def test_outlier_exposure_flattens_the_answer_on_shuffled_images_and_keeps_accuracy() -> None:
    """Trained with the "not mine" term, the model is less certain on patch-shuffled copies of its own
    images than trained without it, and still separates its two classes."""
    from fedcca.training import shuffled_patches, uniform_loss

    def structured_loader(seed: int) -> DeviceLoader:  # class 1: bright top half; class 0: bright bottom half
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (256,), generator=gen)
        images = torch.full((256, 1, 4, 4), 40)
        top = labels == 1
        images[top, :, :2] = 200
        images[~top, :, 2:] = 200
        images = images + torch.randint(-20, 21, images.shape, generator=gen)
        return DeviceLoader(images.clamp(0, 255).to(torch.uint8), labels, 32, shuffle=True, mean=(0.5,),
                            std=(0.25,), device="cpu")

    plain, exposed = tiny_model(), tiny_model()
    train(plain, structured_loader(0), TrainingConfig(epochs=4, lr=0.1), device="cpu")
    train(exposed, structured_loader(0), TrainingConfig(epochs=4, lr=0.1, outlier_exposure=1.0), device="cpu")
    x = torch.cat([b for b, _ in structured_loader(1)])
    torch.manual_seed(1)
    outliers = shuffled_patches(x, grid=2)
    with torch.no_grad():
        assert uniform_loss(exposed(outliers)) < 0.5 * uniform_loss(plain(outliers))
    assert evaluate(exposed, structured_loader(1), device="cpu")[1] > 0.9
    with pytest.raises(ValueError, match="outlier_exposure"):
        TrainingConfig(outlier_exposure=-1.0)
