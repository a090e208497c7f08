"""What client-side alignment costs: the server's aggregation against FedAvg's, the client's share against an epoch.

K clients each take a few SGD steps from one global model on their own images (as
:func:`simulations.cost.make_replies`); each then computes its contribution
(:func:`fedcca.flower.client_alignment.add_alignment`: its share of every candidate merge), timed
against one local epoch on ``--client-examples`` images. The prepared replies are answered to
FedAvg (Flower's) and to ``CCAMerge(alignment="client")`` with one candidate ("cca"; also without
its reply screen, which FedAvg does not have) and with the default search; ``aggregate_train`` is
timed (minimum and median over ``--repeats``, the strategies taking turns within each repeat),
bytes per reply reported::

    python -m simulations.client_alignment_cost --model cnn --clients 64 --out results/cost/client-alignment.json
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp.strategy import FedAvg

from fedcca.app import federation
from fedcca.app.task import TaskConfig
from fedcca.data import DeviceLoader
from fedcca.flower.client_alignment import add_alignment
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import record_bytes, train_reply
from fedcca.flower.strategy import CCAMerge
from fedcca.training import TrainingConfig, train
from simulations import harness
from simulations.cost import profile_call


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurement; write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--calibration-size", type=int, default=500)
    parser.add_argument("--holdout-size", type=int, default=500)
    parser.add_argument("--client-examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", default="fedavg,client cca,client cca unscreened,client search",
                        help="comma-separated rows to measure (fedavg is always measured: the baseline)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one aggregate_train per strategy (fedcca functions by cumulative time)")
    harness.add_runtime_arguments(parser, harness.ROOT / "results" / "cost" / "client-alignment.json")
    args = parser.parse_args(argv)
    harness.apply_runtime(args)
    task = TaskConfig.from_run_config(harness.base_run_config(
        model=args.model, width=args.width, data_dir=args.data_dir, calibration_size=args.calibration_size,
        holdout_size=args.holdout_size))
    dataset = federation.load_data(task.dataset, task.data_dir)
    calibration, holdout = federation.calibration_inputs(task), federation.holdout_set(task)

    def model_fn() -> torch.nn.Module:
        return federation.make_model(task, dataset)

    torch.manual_seed(0)
    global_model = model_fn()
    arrays = ArrayRecord(global_model.state_dict())
    strategies: dict[str, FedAvg] = {
        "fedavg": FedAvg(fraction_evaluate=0.0, min_available_nodes=args.clients),
        "client cca": CCAMerge(model_fn, calibration, "cca", reference="global", alignment="client", device="cpu",
                               fraction_evaluate=0.0, min_available_nodes=args.clients),
        "client cca unscreened": CCAMerge(model_fn, calibration, "cca", reference="global", alignment="client",
                                          screen=None, device="cpu", fraction_evaluate=0.0,
                                          min_available_nodes=args.clients),
        "client search": CCAMerge(model_fn, calibration, holdout=holdout, reference="global", alignment="client",
                                  device="cpu", fraction_evaluate=0.0, min_available_nodes=args.clients),
    }
    wanted = {"fedavg", *(name.strip() for name in args.strategies.split(","))}
    unknown = wanted - set(strategies)
    if unknown:
        parser.error(f"--strategies: unknown {sorted(unknown)}; choose among {sorted(strategies)}")
    strategies = {label: strategy for label, strategy in strategies.items() if label in wanted}
    rng = np.random.default_rng(0)
    trained = []
    for client in range(args.clients):
        indices = np.sort(rng.choice(len(dataset.train_labels), size=32 * args.local_steps, replace=False))
        loader = DeviceLoader.from_dataset(dataset, indices, batch_size=32, device="cpu", seed=client)
        model = copy.deepcopy(global_model)
        train(model, loader, TrainingConfig(epochs=1), device="cpu")
        trained.append((model, loader.num_examples))
    epoch_loader = DeviceLoader.from_dataset(dataset, np.arange(args.client_examples), batch_size=task.batch_size,
                                             device="cpu", seed=0)
    started = time.perf_counter()
    train(copy.deepcopy(global_model), epoch_loader, TrainingConfig(epochs=1), device="cpu")
    epoch_seconds = time.perf_counter() - started
    rows, payload = [], {"model": args.model, "width": args.width, "clients": args.clients,
                         "epoch_seconds": epoch_seconds, "strategies": {}}
    replies: dict[str, list[Message]] = {}
    for label, strategy in strategies.items():
        messages = list(strategy.configure_train(2, arrays, ConfigRecord(), _nodes_grid(args.clients)))
        replies[label], client_seconds = [], []
        for message, (model, examples) in zip(messages, trained):
            started = time.perf_counter()
            content = add_alignment(train_reply(model.state_dict(), examples), message, model, calibration,
                                    device="cpu")
            client_seconds.append(time.perf_counter() - started)
            replies[label].append(Message(content, reply_to=message))
        payload["strategies"][label] = {"client_seconds": float(np.median(client_seconds)),
                                        "reply_bytes": float(np.median([record_bytes(r) for r in replies[label]]))}
    # The strategies take turns within each repeat, so a slow spell of the machine reaches all of them.
    seconds: dict[str, list[float]] = {label: [] for label in strategies}
    for _ in range(args.repeats):
        for label, strategy in strategies.items():
            strategy.configure_train(2, arrays, ConfigRecord(), _nodes_grid(args.clients))
            copies = [copy.deepcopy(reply) for reply in replies[label]]
            started = time.perf_counter()
            strategy.aggregate_train(2, copies)
            seconds[label].append(time.perf_counter() - started)
            del copies
    for label, strategy in strategies.items():
        entry: dict[str, Any] = payload["strategies"][label]
        entry["aggregate_seconds"] = min(seconds[label])
        entry["aggregate_seconds_median"] = float(np.median(seconds[label]))
        if args.profile:
            strategy.configure_train(2, arrays, ConfigRecord(), _nodes_grid(args.clients))
            copies = [copy.deepcopy(reply) for reply in replies[label]]
            entry["profile"] = profile_call(lambda s=strategy, c=copies: s.aggregate_train(2, c))
        print(f"[client-alignment] {label}: {entry}", flush=True)
    base = payload["strategies"]["fedavg"]
    for label, entry in payload["strategies"].items():
        rows.append([label, entry["aggregate_seconds"], entry["aggregate_seconds"] / base["aggregate_seconds"],
                     entry["aggregate_seconds_median"],
                     entry["aggregate_seconds_median"] / base["aggregate_seconds_median"], entry["client_seconds"], entry["client_seconds"] / epoch_seconds,
                     entry["reply_bytes"] / 1e6, entry["reply_bytes"] / base["reply_bytes"]])
    harness.write_json(args.out, payload)
    table = harness.markdown_table(["strategy", "aggregate_train s (min)", "x FedAvg", "median s", "x FedAvg's median",
                                    "client share s",
                                    f"x one epoch on {args.client_examples} images", "MB per reply",
                                    "x FedAvg's bytes"], rows)
    if args.profile:
        for label, entry in payload["strategies"].items():
            table += f"\n{label}: where aggregate_train's time goes (cumulative, profiler overhead included)\n\n"
            table += harness.markdown_table(["function", "calls", "s", "share"],
                                            [[row["function"], row["calls"], row["seconds"], row["share"]]
                                             for row in entry.get("profile", [])]) + "\n"
    args.out.with_suffix(".md").write_text(f"{args.model} x{args.width:g}, K = {args.clients}, round 2, 2-core CPU\n\n"
                                           + table + "\n")
    print(table)
    return payload


def _nodes_grid(count: int) -> InProcessGrid:
    return InProcessGrid({node: _unused for node in range(1, count + 1)})


def _unused(message: Message, context: Context) -> Message:  # the replies are prepared, never asked for
    raise RuntimeError("not called")


if __name__ == "__main__":
    main()
