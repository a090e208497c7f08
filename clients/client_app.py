"""fedcca ClientApp: train on the local shard, then measure alignment statistics.

A train message carries the global model and a config. The client trains a copy on its
shard (``partition-id`` of ``num-partitions``, from the node config), with FedProx's proximal
term when the strategy sends ``proximal-mu``, and, when the config sets
``fedcca.compute-statistics``, computes the statistics of its trained model (B) against the
model it received (the reference A) on the public calibration set, so the server can align
without running either model; with ``fedcca.preactivation-moments`` also its model's
pre-activation moments (REPAIR's targets); with ``fedcca.align-to-global`` it aligns itself to the
received model and sends its share of every candidate merge (:mod:`fedcca.flower.client_alignment`);
with ``fedcca.label-counts`` its training examples per class (a distillation teacher's input).
CUDA is used when present.
"""

from __future__ import annotations

import copy
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcca.app import federation
from fedcca.app.task import TaskConfig
from fedcca.data import DeviceLoader
from fedcca.devices import resolve_device
from fedcca.flower.client_alignment import ALIGNED_KEY, add_alignment
from fedcca.flower.protocol import METRICS_KEY, diverged_reply, read_train_instruction, train_reply
from fedcca.flower.teacher_inputs import LABEL_COUNTS_FLAG, LABEL_COUNTS_KEY, label_counts
from fedcca.merging.repair import statistics_and_preactivation
from fedcca.spec.tracing import spec_for
from fedcca.statistics import collect_statistics
from fedcca.training import TrainingDivergedError
from fedcca.training import train as train_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model locally and reply weights, metrics and (if asked) statistics.

    Args:
        msg: Train instruction (``fedcca.flower.protocol.train_instruction``, or any FedAvg/FedProx message).
        context: Supplies the run config and the node's ``partition-id``/``num-partitions``.
    """
    task = TaskConfig.from_run_config(context.run_config)
    partition_id, num_partitions = federation.node_partition(context.node_config)
    instruction = read_train_instruction(msg)
    device = resolve_device(None)
    dataset = federation.load_data(task.dataset, task.data_dir)

    model = federation.make_model(task, dataset)
    model.load_state_dict(instruction.arrays.to_torch_state_dict())
    reference = copy.deepcopy(model)  # the received model: alignment target A

    # Every random draw of this round depends on (seed, round, client) only: reruns and
    # resumed runs train identically.
    round_seed = federation.derive_seed(task.seed, instruction.server_round, partition_id)
    federation.seed_everything(round_seed)
    loader = DeviceLoader.from_dataset(dataset, federation.client_indices(task, partition_id, num_partitions),
                                       batch_size=task.batch_size, device=device, seed=round_seed)
    try:
        result = train_model(model, loader, task.training(instruction.proximal_mu), device=device)
    except TrainingDivergedError as err:  # a reason the server logs, not a runtime exception
        return diverged_reply(msg, str(err))

    statistics, preactivation, stats_seconds = None, None, 0.0
    if instruction.compute_statistics:
        started = time.perf_counter()
        calibration = federation.calibration_inputs(task)
        spec = spec_for(reference, calibration[:1])  # derived once for both measurements
        # Only our model's moments and the cross moment travel: the server measures the received model's.
        if instruction.send_preactivation:  # with REPAIR's endpoint statistics, from the same forward pass
            statistics, preactivation = statistics_and_preactivation(reference, model, calibration, spec,
                                                                     reference_moments=False, device=device)
        else:
            statistics = collect_statistics(reference, [model], calibration, spec, reference_moments=False,
                                            device=device)[0]
        stats_seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = {"train-loss": result["loss"], "train-seconds": result["seconds"], "stats-seconds": stats_seconds}
    if instruction.config.get(LABEL_COUNTS_FLAG, False):  # asked by a "label-counts" distillation teacher
        metrics[LABEL_COUNTS_KEY] = label_counts(loader.labels, dataset.num_classes)
    content = train_reply(model.state_dict(), loader.num_examples, metrics, statistics, preactivation)
    # Client-side alignment (when the strategy asks): our share of every candidate merge onto the received model.
    content = add_alignment(content, msg, model, federation.calibration_inputs(task), device=device)
    if ALIGNED_KEY in content:
        content[METRICS_KEY]["align-seconds"] = time.perf_counter() - started
    return Message(content, reply_to=msg)
