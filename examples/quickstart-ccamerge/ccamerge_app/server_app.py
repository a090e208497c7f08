"""The ServerApp: Flower's quickstart one with CCAMerge in place of FedAvg (and run records)."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ccamerge_app.task import Net, public_data, test, test_loader
from fedcca import CCAMerge, RecordRounds, public_split

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of CCAMerge; evaluate centrally; save the final model."""
    config = context.run_config
    data_dir, public_size = str(config["data-dir"]), int(config["public-size"])
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    # The public set every party has: half calibration (statistics), half labelled hold-out (the choice).
    calibration, holdout = public_split(public_data(data_dir, public_size), public_size // 2,
                                        public_size - public_size // 2)
    # Was: strategy = FedAvg(fraction_train=config["fraction-train"])
    strategy = CCAMerge(Net, calibration, holdout=holdout, fraction_train=float(config["fraction-train"]),
                        fraction_evaluate=0.0)
    # Optional: progress with ETA, history.json and accuracy.png rewritten every round.
    strategy = RecordRounds(strategy, out_dir=Path(str(config["out-dir"])), title="CCAMerge, Flower quickstart")

    loader = test_loader(data_dir)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, loader, device)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": float(config["lr"])}),
                            num_rounds=int(config["num-server-rounds"]), evaluate_fn=central_evaluate)
    # strategy.out_dir: out-dir, or out-dir-2, ... when out-dir holds an earlier run
    torch.save(result.arrays.to_torch_state_dict(), strategy.out_dir / "final_model.pt")
