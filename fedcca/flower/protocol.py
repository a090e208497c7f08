"""Wire protocol between the CCAMerge strategy and the fedcca ClientApp.

A train message carries the global model (``ArrayRecord`` under :data:`WEIGHTS_KEY`) and a
``ConfigRecord`` under :data:`CONFIG_KEY`; when :data:`COMPUTE_STATS_FLAG` is true in it,
the client also sends the alignment statistics of its trained model (B) against the
received global model (A) as a second ``ArrayRecord`` under :data:`STATISTICS_KEY`; when
:data:`PREACTIVATION_FLAG` is true as well, that record also holds its model's pre-activation
moments (REPAIR's endpoint statistics), so the server runs no client model at all.
A reply from a plain FedAvg-style ClientApp (weights + one ``MetricRecord`` with
``num-examples``) is valid too; the server then computes the statistics itself.

:func:`train_instruction` / :func:`read_train_instruction` build and read train messages,
:func:`train_reply` builds a reply, and :func:`validate_reply` turns one reply into a
:class:`ClientUpdate` or raises :class:`InvalidReplyError` with a one-line reason. Every
place that speaks the protocol (the strategy, the ClientApp, benchmarks, tests) uses these.
"""

from __future__ import annotations

import warnings

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

# The statistics record's codec, re-exported as part of the protocol.
from fedcca.flower.wire_statistics import (  # noqa: F401
    FORMAT_KEY,
    PREACTIVATION_PREFIX,
    READABLE_FORMATS,
    STATISTICS_FORMAT,
    decode_declared,
    decode_statistics,
    statistics_from_record,
    statistics_to_record,
)
from fedcca.spec.alignment import AlignmentSpec
from fedcca.statistics import ClientStatistics, PairStatistics, StatisticsError

WEIGHTS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATISTICS_KEY = "fedcca.statistics"
ALIGNED_RECORD_KEY = "fedcca.aligned"  # client-side alignment (fedcca.flower.client_alignment.ALIGNED_KEY)
COMPUTE_STATS_FLAG = "fedcca.compute-statistics"
NUM_EXAMPLES_KEY = "num-examples"
PREACTIVATION_FLAG = "fedcca.preactivation-moments"
LABEL_COUNTS_FLAG = "fedcca.label-counts"  # asks for the metric LABEL_COUNTS_KEY (fedcca.flower.teacher_inputs)
LABEL_COUNTS_KEY = "label-counts"
SERVER_ROUND_KEY = "server-round"
PROXIMAL_MU_KEY = "proximal-mu"  # set by Flower's FedProx
TRAINING_DIVERGED_CODE = 4100
"""``Error.code`` of a reply whose local training diverged (non-finite loss); the reason names the step."""


@dataclass(frozen=True)
class TrainInstruction:
    """What a train message asks of a client.

    Args:
        arrays: The global model.
        server_round: The round (0 when the strategy did not say).
        compute_statistics: Send alignment statistics of the trained model against ``arrays``.
        send_preactivation: With them, the trained model's pre-activation moments.
        proximal_mu: FedProx's proximal weight ``mu`` (0: plain local training).
        config: The whole ``ConfigRecord``.
    """

    arrays: ArrayRecord
    server_round: int
    compute_statistics: bool
    send_preactivation: bool
    proximal_mu: float
    config: ConfigRecord


def train_instruction(arrays: ArrayRecord, server_round: int, compute_statistics: bool = True,
                      **config: int | float | str | bool) -> RecordDict:
    """The content of a train message (as ``CCAMerge.configure_train`` sends it).

    Args:
        arrays: The global model.
        server_round: The round number.
        compute_statistics: Ask for alignment statistics.
        **config: Further config entries.
    """
    record = ConfigRecord({SERVER_ROUND_KEY: server_round, COMPUTE_STATS_FLAG: compute_statistics, **config})
    return RecordDict({WEIGHTS_KEY: arrays, CONFIG_KEY: record})


def read_train_instruction(message: Message) -> TrainInstruction:
    """Decode a train message (ours, or any FedAvg/FedProx strategy's).

    Raises:
        InvalidReplyError: The message lacks the weights or the config record.
    """
    content = message.content
    if WEIGHTS_KEY not in content.array_records or CONFIG_KEY not in content.config_records:
        raise InvalidReplyError(f"train message lacks ArrayRecord '{WEIGHTS_KEY}' or ConfigRecord '{CONFIG_KEY}' "
                                f"(has {sorted(content)})")
    config = content.config_records[CONFIG_KEY]
    mu = float(config.get(PROXIMAL_MU_KEY, 0.0))  # type: ignore[arg-type]
    if not (math.isfinite(mu) and mu >= 0):
        raise InvalidReplyError(f"'{PROXIMAL_MU_KEY}' must be finite and >= 0, got {mu!r}")
    compute = bool(config.get(COMPUTE_STATS_FLAG, False))
    return TrainInstruction(content.array_records[WEIGHTS_KEY], int(config.get(SERVER_ROUND_KEY, 0)),  # type: ignore[arg-type]
                            compute, compute and bool(config.get(PREACTIVATION_FLAG, False)), mu, config)


def diverged_reply(message: Message, reason: str) -> Message:
    """The error reply of a client whose local training diverged: code :data:`TRAINING_DIVERGED_CODE`
    and a one-line reason the server logs and records (instead of an exception from the runtime)."""
    return Message(error=Error(code=TRAINING_DIVERGED_CODE, reason=f"local training diverged: {reason}"),
                   reply_to=message)


def train_reply(state_dict: Mapping[str, torch.Tensor], num_examples: int | float,
                metrics: Mapping[str, int | float | list[int]] | None = None,
                statistics: Mapping[str, PairStatistics] | None = None,
                preactivation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> RecordDict:
    """The content of a train reply: weights, metrics with ``num-examples``, optional statistics.

    Args:
        state_dict: The trained weights (copied to the CPU).
        num_examples: The reply's weight in the average.
        metrics: Further metrics.
        statistics: Alignment statistics of the trained model (B) against the received one (A).
        preactivation: The trained model's pre-activation ``{point: (mean, covariance)}``
            (:func:`fedcca.merging.repair.preactivation_statistics`, BatchNorm as the model has it);
            sent with ``statistics`` only.
    """
    content = RecordDict({
        WEIGHTS_KEY: ArrayRecord({key: value.detach().cpu() for key, value in state_dict.items()}),
        METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: num_examples, **(metrics or {})}),
    })
    if statistics is not None:
        content[STATISTICS_KEY] = statistics_to_record(statistics, preactivation)
    return content


class InvalidReplyError(ValueError):
    """A reply that cannot be merged; ``str(error)`` is the reason, one line."""


@dataclass
class ClientUpdate:
    """One validated, decoded training reply.

    Args:
        node_id: The replying node (``msg.metadata.src_node_id``).
        state_dict: The trained weights as CPU tensors, keys and dtypes as the model's.
        num_examples: The reply's weight in the average (positive, finite).
        statistics: What the client sent of its alignment statistics (trained model = B,
            against the received model = A), or ``None`` when the reply carries none; the server
            pairs them with the received model's own moments (:func:`fedcca.statistics.assemble`).
        preactivation: The trained model's pre-activation ``{point: (mean, covariance)}`` when
            the client sent them (validated for shape, finiteness and non-negative variances).
        metrics: The reply's ``MetricRecord``.
        num_bytes: Payload size of the reply (all records).
        statistics_bytes: Payload size of the statistics record (0 without one).
        aligned: Its client-side alignment contribution (:mod:`fedcca.flower.client_alignment`), once decoded.
    """

    node_id: int
    state_dict: dict[str, torch.Tensor]
    num_examples: float
    statistics: dict[str, ClientStatistics] | None
    metrics: MetricRecord
    num_bytes: int
    statistics_bytes: int
    preactivation: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    aligned: dict[str, torch.Tensor] | None = None




class DecodedWeights:
    """Weights already decoded from a round's replies, so that each reply is decoded once.

    A reply screen decodes a reply's weights to measure its update; the strategy that merges the
    same reply next takes them from here instead of decoding its bytes again. Entries are keyed
    by the message object itself and taken once.

    Args:
        views: Weights decoded for this round are read-only views of the replies' bytes, not copies
            (:func:`validate_reply`): for a merge that only reads them (a summed round), which saves a
            copy of every reply. Torch does not mark such tensors read-only; writing into one is an error
            numpy would have refused, so only a reader may ask for them.
    """

    def __init__(self, views: bool = False) -> None:
        self.views = views
        self._entries: dict[int, tuple[Message, dict[str, torch.Tensor]]] = {}

    def put(self, message: Message, state_dict: dict[str, torch.Tensor]) -> None:
        """Keep ``message``'s decoded and validated weights."""
        self._entries[id(message)] = (message, state_dict)

    def take(self, message: Message) -> dict[str, torch.Tensor] | None:
        """``message``'s weights if they were kept (and forget them), else None."""
        entry = self._entries.pop(id(message), None)
        return entry[1] if entry is not None and entry[0] is message else None


def record_bytes(message: Message) -> int:
    """Return the payload size of ``message`` in bytes (0 for an error reply).

    Args:
        message: Any Flower message.
    """
    if not message.has_content():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


def validate_reply(
    message: Message,
    template: Mapping[str, torch.Tensor],
    spec: AlignmentSpec | None,
    *,
    weights_key: str = WEIGHTS_KEY,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
    preactivation_sizes: Mapping[str, int] | None = None,
    decoded: DecodedWeights | None = None,
) -> ClientUpdate:
    """Check one training reply and decode it.

    A valid reply has no error, exactly the ``ArrayRecord`` ``weights_key`` (plus, optionally,
    :data:`STATISTICS_KEY`), exactly one ``MetricRecord`` holding a positive finite number
    under ``weighted_by_key``, and no other record. Weights must have exactly the keys,
    shapes and dtypes of ``template`` and be finite; statistics must fit ``spec``.

    Args:
        message: A reply to a train message.
        template: A state dict of the model (e.g. ``model_fn().state_dict()``).
        spec: The model's alignment spec, used to check statistics (None: statistics are not
            read; a merge that aligns nothing has no use for them).
        weights_key: Record name of the weights (the strategy's ``arrayrecord_key``).
        weighted_by_key: Metric holding the number of training examples.
        preactivation_sizes: ``{point: features}`` whose pre-activation moments a reply may carry
            (:func:`decode_statistics`).
        decoded: Where this message's weights may have been decoded already (by a reply screen);
            those are taken from there and checked against ``template`` again (names, shapes,
            dtypes), not re-decoded. Weights decoded here are views when its ``views`` is set.

    Raises:
        InvalidReplyError: With the reason, when the reply cannot be merged.
    """
    _raise_if_error(message)
    content = message.content
    arrays, metrics = _check_record_names(content, weights_key)
    state_dict = decoded.take(message) if decoded is not None else None
    if state_dict is None:
        state_dict = _decode_weights(arrays[weights_key], template, views=decoded is not None and decoded.views)
    else:
        _check_decoded(state_dict, template)
    statistics, preactivation, statistics_bytes = None, None, 0
    if STATISTICS_KEY in arrays:
        stats_record = arrays[STATISTICS_KEY]
        if spec is not None:
            try:
                statistics, preactivation = decode_statistics(stats_record, spec, preactivation_sizes)
            except StatisticsError as err:
                raise InvalidReplyError(f"invalid statistics: {err}") from err
        statistics_bytes = stats_record.count_bytes()
    return ClientUpdate(
        node_id=message.metadata.src_node_id,
        state_dict=state_dict,
        num_examples=_num_examples(metrics, weighted_by_key),
        statistics=statistics,
        metrics=metrics,
        num_bytes=record_bytes(message),
        statistics_bytes=statistics_bytes,
        preactivation=preactivation,
    )


def validate_evaluate_reply(message: Message, weighted_by_key: str = NUM_EXAMPLES_KEY) -> MetricRecord:
    """Check an evaluation reply: no error, exactly one ``MetricRecord`` with a positive weight.

    Args:
        message: A reply to an evaluate message.
        weighted_by_key: Metric holding the number of evaluated examples.

    Raises:
        InvalidReplyError: With the reason, when the reply cannot be averaged.
    """
    _raise_if_error(message)
    records = list(message.content.metric_records.values())
    if len(records) != 1:
        raise InvalidReplyError(f"expected exactly one MetricRecord, found {len(records)}")
    _num_examples(records[0], weighted_by_key)
    return records[0]


def _raise_if_error(message: Message) -> None:
    if message.has_error():
        raise InvalidReplyError(f"error reply (code {message.error.code}): {message.error.reason}")


def _check_record_names(content: RecordDict, weights_key: str) -> tuple[dict[str, ArrayRecord], MetricRecord]:
    """The reply's ArrayRecords by name and its MetricRecord, once the names are what a reply may hold
    (read in one pass: each of Flower's per-type views of a RecordDict is a new dict)."""
    arrays: dict[str, ArrayRecord] = {}
    metrics: list[MetricRecord] = []
    configs: list[str] = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays[name] = record
        elif isinstance(record, MetricRecord):
            metrics.append(record)
        elif isinstance(record, ConfigRecord):
            configs.append(name)
    if weights_key not in arrays:
        raise InvalidReplyError(f"missing ArrayRecord '{weights_key}' (has {sorted(arrays)})")
    extra = set(arrays) - {weights_key, STATISTICS_KEY, ALIGNED_RECORD_KEY}
    if extra:
        raise InvalidReplyError(f"unexpected ArrayRecord(s) {sorted(extra)}")
    # Like FedAvg: exactly one MetricRecord, whatever its name.
    if len(metrics) != 1:
        raise InvalidReplyError(f"expected exactly one MetricRecord, found {len(metrics)}")
    if configs:
        raise InvalidReplyError(f"unexpected ConfigRecord(s) {sorted(configs)}")
    return arrays, metrics[0]


def _decode_weights(
    record: ArrayRecord, template: Mapping[str, torch.Tensor], views: bool = False
) -> dict[str, torch.Tensor]:
    missing = [key for key in template if key not in record]
    extra = [key for key in record if key not in template]
    if missing or extra:
        raise InvalidReplyError(f"weight keys differ from the model: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
    state_dict: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # Views are asked for by readers only (DecodedWeights.views): torch's warning that it cannot mark
        # a tensor of read-only memory read-only says nothing to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        for key, expected in template.items():
            # The declared dtype/shape/size first (nothing is allocated for a lying header), then the decoded bytes.
            array = decode_declared(record[key], key, tuple(expected.shape), (_numpy_dtype(expected.dtype),),
                                    InvalidReplyError, "weight", copy=not views)
            state_dict[key] = torch.from_numpy(array)
    return state_dict


def _check_decoded(state_dict: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> None:
    """Weights decoded against another template still fit this one (names, shapes, dtypes)."""
    if state_dict.keys() != template.keys():
        raise InvalidReplyError("weight keys differ from the model")
    for key, expected in template.items():
        value = state_dict[key]
        if value.dtype != expected.dtype or value.shape != expected.shape:
            raise InvalidReplyError(f"weight '{key}' has {value.dtype} {tuple(value.shape)}, expected "
                                    f"{expected.dtype} {tuple(expected.shape)}")


def _num_examples(metrics: MetricRecord, key: str) -> float:
    if key not in metrics:
        raise InvalidReplyError(f"MetricRecord lacks '{key}'")
    value = metrics[key]
    # MetricRecord never holds bools, but lists are allowed: reject them here.
    if not isinstance(value, (int, float)):
        raise InvalidReplyError(f"'{key}' is not a number: {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidReplyError(f"'{key}' must be positive and finite, got {value!r}")
    return float(value)


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype
