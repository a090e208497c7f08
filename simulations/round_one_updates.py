"""How far honest round-1 clients move from the initial model, with and without gradient clipping.

Each client of a label-skewed split trains one local epoch from the app's initial model (the
ClientApp's data, seeds and optimiser; the app's defaults otherwise) and reports its update's
norm ``|w - g| / |g|``, or NaN when its training diverged. This is what the reply screen's
round-1 bound (10 |g|) and the default ``max-grad-norm`` were set from::

    python -m simulations.round_one_updates --splits C1,C2,D0.05 --lrs 0.05,0.1 --clips none,5,2 \\
        --out results/stress/round-one-updates.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedcca.app.federation import (
    client_indices,
    derive_seed,
    load_data,
    make_model,
    seed_everything,
)
from fedcca.app.task import TaskConfig
from fedcca.data import DeviceLoader
from fedcca.training import TrainingConfig, TrainingDivergedError, train
from simulations.harness import (
    add_runtime_arguments,
    apply_runtime,
    base_run_config,
    markdown_table,
    parse_list,
    write_json,
)
from simulations.stress import SPLITS


def updates(split: str, lr: float, clip: float | None, clients: Sequence[int], num_clients: int,
            seed: int = 0) -> list[float]:
    """``|w - g| / |g|`` of each client after one local epoch from the initial model (NaN: diverged)."""
    task = TaskConfig.from_run_config(base_run_config(**SPLITS[split], seed=seed))
    dataset = load_data(task.dataset, task.data_dir)
    seed_everything(derive_seed(seed))
    initial = make_model(task, dataset).state_dict()
    norm = float(torch.cat([v.double().flatten() for v in initial.values() if v.is_floating_point()]).norm())
    out = []
    for client in clients:
        model = make_model(task, dataset)
        model.load_state_dict(initial)
        round_seed = derive_seed(seed, 1, client)
        seed_everything(round_seed)
        loader = DeviceLoader.from_dataset(dataset, client_indices(task, client, num_clients),
                                           batch_size=task.batch_size, device=torch.device("cpu"), seed=round_seed)
        try:
            train(model, loader, TrainingConfig(epochs=1, lr=lr, max_grad_norm=clip), device="cpu")
        except TrainingDivergedError:
            out.append(float("nan"))
            continue
        state = model.state_dict()
        moved = torch.cat([(state[k] - initial[k]).double().flatten() for k in initial if initial[k].is_floating_point()])
        out.append(float(moved.norm()) / norm)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every (split, lr, clip) of the command line; write JSON and a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--splits", default="C1,C2,D0.05")
    parser.add_argument("--lrs", default="0.05,0.1")
    parser.add_argument("--clips", default="none,5,2", help="max-grad-norm values; none: no clipping")
    parser.add_argument("--clients", default="0,2,4,6,8", help="client ids of the 10-client split")
    add_runtime_arguments(parser, Path("results/stress/round-one-updates.json"))
    args = parser.parse_args(argv)
    apply_runtime(args)
    rows = []
    for split in parse_list(args.splits):
        for lr in parse_list(args.lrs, float):
            for clip_text in parse_list(args.clips):
                clip = None if clip_text == "none" else float(clip_text)
                found = updates(split, lr, clip, parse_list(args.clients, int), 10)
                rows.append({"split": split, "lr": lr, "max_grad_norm": clip_text, "updates": found})
                print(f"[round-one] {split} lr {lr:g} clip {clip_text}: " + " ".join(f"{u:.3g}" for u in found),
                      flush=True)
    given = list(argv) if argv is not None else sys.argv[1:]
    payload = {"command": "python -m simulations.round_one_updates " + " ".join(given), "rows": rows}
    write_json(args.out, payload)
    args.out.with_suffix(".md").write_text(markdown_table(
        ["split", "lr", "max-grad-norm", "update norm / initial norm, per client (nan: diverged)"],
        [[r["split"], r["lr"], r["max_grad_norm"], " ".join(f"{u:.3g}" for u in r["updates"])] for r in rows]) + "\n")
    return payload


if __name__ == "__main__":
    main()
