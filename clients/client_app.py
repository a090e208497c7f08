"""fedcca ClientApp: train on the local shard, then measure alignment statistics.

A train message carries the global model and a config. The client trains a copy on its
shard (``partition-id`` of ``num-partitions``, from the node config) and, when the config
sets ``fedcca.compute-statistics``, computes the statistics of its trained model (B)
against the model it received (the reference A) on the public calibration set, so the
server can align without running either model. CUDA is used when present.
"""

from __future__ import annotations

import copy
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.task import (
    TaskConfig,
    calibration_inputs,
    client_indices,
    derive_seed,
    load_data,
    make_model,
    node_partition,
    seed_everything,
)
from fedcca.data import DeviceLoader
from fedcca.devices import resolve_device
from fedcca.protocol import (
    COMPUTE_STATS_FLAG,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    STATISTICS_KEY,
    WEIGHTS_KEY,
    statistics_to_record,
)
from fedcca.statistics import collect_statistics
from fedcca.training import train as train_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model locally and reply weights, metrics and (if asked) statistics.

    Args:
        msg: Train instruction: ``ArrayRecord`` "arrays" (global model) and ``ConfigRecord``
            "config" (``server-round``, optionally ``fedcca.compute-statistics``).
        context: Supplies the run config and the node's ``partition-id``/``num-partitions``.
    """
    task = TaskConfig.from_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context.node_config)
    config: ConfigRecord = msg.content[CONFIG_KEY]
    server_round = int(config.get("server-round", 0))
    device = resolve_device(None)
    dataset = load_data(task.dataset, task.data_dir)

    model = make_model(task, dataset)
    model.load_state_dict(msg.content[WEIGHTS_KEY].to_torch_state_dict())
    reference = copy.deepcopy(model)  # the received model: alignment target A

    # Every random draw of this round depends on (seed, round, client) only: reruns and
    # resumed runs train identically.
    round_seed = derive_seed(task.seed, server_round, partition_id)
    seed_everything(round_seed)
    loader = DeviceLoader.from_dataset(dataset, client_indices(task, partition_id, num_partitions),
                                       batch_size=task.batch_size, device=device, seed=round_seed)
    result = train_model(model, loader, task.local_epochs, lr=task.lr, device=device)

    content = RecordDict({WEIGHTS_KEY: _cpu_arrays(model)})
    stats_seconds = 0.0
    if config.get(COMPUTE_STATS_FLAG, False):
        started = time.perf_counter()
        stats = collect_statistics(reference, [model], calibration_inputs(task), device=device)[0]
        content[STATISTICS_KEY] = statistics_to_record(stats)
        stats_seconds = time.perf_counter() - started
    content[METRICS_KEY] = MetricRecord({
        NUM_EXAMPLES_KEY: loader.num_examples,
        "train-loss": result["loss"],
        "train-seconds": result["seconds"],
        "stats-seconds": stats_seconds,
    })
    return Message(content, reply_to=msg)


def _cpu_arrays(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({key: value.detach().cpu() for key, value in model.state_dict().items()})
