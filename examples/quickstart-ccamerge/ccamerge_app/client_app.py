"""The ClientApp: Flower's quickstart one, unchanged by CCAMerge (a plain FedAvg-style reply)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ccamerge_app.task import Net, load_data, train

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on this node's shard; reply with its weights and example count."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    config = context.run_config
    loader = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                       str(config["data-dir"]), int(config["public-size"]), int(config["batch-size"]))
    loss = train(model, loader, int(config["local-epochs"]), float(msg.content["config"]["lr"]), device)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(loader.dataset)})})
    return Message(content=content, reply_to=msg)
