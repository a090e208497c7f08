"""The model, the data and the training loop, as in Flower's PyTorch quickstart (Fashion-MNIST, read locally)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcca.data import load_dataset, normalize


class Net(nn.Module):
    """Flower's quickstart CNN (LeNet-5 style), for 1-channel 28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _images(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = load_dataset("fashion-mnist", data_dir or None)
    x, y = (dataset.train_images, dataset.train_labels) if split == "train" else (dataset.test_images,
                                                                                  dataset.test_labels)
    return normalize(x, dataset), y


def public_data(data_dir: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``size`` training images: public, never in a client's shard."""
    x, y = _images(data_dir, "train")
    return x[-size:], y[-size:]


def load_data(partition_id: int, num_partitions: int, data_dir: str, public_size: int,
              batch_size: int) -> DataLoader:
    """Client ``partition_id``'s IID shard of the non-public training images."""
    x, y = _images(data_dir, "train")
    x, y = x[:-public_size], y[:-public_size]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(42))
    shard = order[partition_id::num_partitions]
    return DataLoader(TensorDataset(x[shard], y[shard]), batch_size=batch_size, shuffle=True)


def test_loader(data_dir: str, batch_size: int = 256) -> DataLoader:
    """The test split, for the server's evaluation."""
    return DataLoader(TensorDataset(*_images(data_dir, "test")), batch_size=batch_size)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Local SGD; returns the mean training loss."""
    net.to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    total, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


def test(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """``(loss, accuracy)`` on ``loader``."""
    net.to(device).eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            outputs = net(images.to(device))
            loss += F.cross_entropy(outputs, labels.to(device), reduction="sum").item()
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
            count += len(labels)
    return loss / count, correct / count
