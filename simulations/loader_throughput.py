"""Images per second of DeviceLoader vs a plain torch DataLoader on Fashion-MNIST (CPU).

Two measurements per pipeline, on the same examples and batch size:
  * data: one epoch of batches, no model (the pure input-pipeline cost);
  * train: one training epoch of ``build_model("cnn")`` with ``fedcca.training.train``.
The baseline is what a typical user writes: a ``Dataset`` over the uint8 tensors whose
``__getitem__`` converts and normalises one image, fed through ``DataLoader(shuffle=True)``.

    python -m simulations.loader_throughput --train-subset 10000 --threads 1 --out outputs/loader_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fedcca.data import Dataset, DeviceLoader, load_dataset
from fedcca.training import train


class PerSampleNormalized(torch.utils.data.Dataset):
    """The baseline: uint8 images converted and normalised one at a time in ``__getitem__``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[i].float() / 255 - self.mean) / self.std, self.labels[i]


def _loaders(data: Dataset, n: int, batch_size: int, seed: int) -> dict[str, Callable[[], Iterable]]:
    images, labels = data.train_images[:n], data.train_labels[:n]

    def device_loader() -> DeviceLoader:
        return DeviceLoader(images, labels, batch_size, mean=data.mean, std=data.std, device="cpu", seed=seed)

    def torch_loader() -> DataLoader:
        dataset = PerSampleNormalized(images, labels, data.mean[0], data.std[0])
        return DataLoader(dataset, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))

    return {"DeviceLoader": device_loader, "DataLoader": torch_loader}


def _data_seconds(loader: Iterable) -> float:
    start = time.perf_counter()
    for x, y in loader:
        pass
    return time.perf_counter() - start


def _train_seconds(loader: Iterable, seed: int) -> float:
    from fedcca.models import build_model  # only here: --skip-train works without the models module

    torch.manual_seed(seed)  # the same initial model for both pipelines
    return train(build_model("cnn"), loader, 1, lr=0.05, device="cpu")["seconds"]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, write JSON to ``--out`` and return the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: system package)")
    parser.add_argument("--train-subset", type=int, default=10000, help="first N training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data-repeats", type=int, default=3, help="data-only epochs per pipeline (best kept)")
    parser.add_argument("--skip-train", action="store_true", help="measure only the data pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/loader_throughput.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir)
    n = min(args.train_subset, len(data.train_labels))
    results = {}
    for name, make in _loaders(data, n, args.batch_size, args.seed).items():
        data_s = min(_data_seconds(make()) for _ in range(args.data_repeats))
        train_s = None if args.skip_train else _train_seconds(make(), args.seed)
        results[name] = {
            "data_seconds": data_s,
            "data_images_per_s": n / data_s,
            "train_seconds": train_s,
            "train_images_per_s": None if train_s is None else n / train_s,
        }

    print(f"Fashion-MNIST, {n} images, batch {args.batch_size}, {args.threads} thread(s), CPU")
    print(f"{'pipeline':<14}{'data img/s':>14}{'train img/s':>14}{'train s':>10}")
    for name, r in results.items():
        train_rate = "-" if r["train_seconds"] is None else f"{r['train_images_per_s']:.0f}"
        train_s = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.2f}"
        print(f"{name:<14}{r['data_images_per_s']:>14.0f}{train_rate:>14}{train_s:>10}")
    report = {
        "dataset": "fashion-mnist",
        "images": n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "model": "cnn",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
