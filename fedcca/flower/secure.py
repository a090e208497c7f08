"""Client-side alignment under Flower's secure aggregation (SecAgg+), where the server never sees one reply.

In flwr 1.41 ``SecAggPlusWorkflow`` (``flwr.server.workflow``) drives a *legacy* ``flwr.server.strategy``
object through ``LegacyContext``: clients (with ``secaggplus_mod``) mask their ``FitRes`` parameters, the
workflow unmasks only their weighted average (by ``num_examples``, quantised after clipping to
``[-clipping_range, clipping_range]``) and hands it to ``aggregate_fit``. :class:`SecureCCAMerge` is the
legacy face of ``CCAMerge(alignment="client")`` for that workflow: every round asks clients to align
themselves to the broadcast model (:data:`~fedcca.flower.client_alignment.ALIGN_KEY`); a client's
parameters are its (first form's) weights followed by the rest of its contribution
(:func:`aligned_parameters`); the server splits the average, builds every candidate (BatchNorm
recomputed, REPAIR) and keeps the one chosen on the hold-out set.

Round 1 aligns to the initial model as well (no individual reply exists to serve as reference); the
hold-out choice keeps FedAvg's average when that alignment does not help. Per-reply screening is
impossible by construction, and Flower's client-side DP clipping mods do not compose with it (they clip
the model update only and refuse parameters longer than the model).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from torch import nn

from fedcca.flower.client_alignment import (
    ALIGN_KEY,
    aligned_layout,
    contribution_merger,
    search_from_json,
    search_to_json,
    reply_parts,
    reply_weight_names,
    with_reply_weights,
)
from fedcca.merging.config import MergeConfig, MergeSearch, resolve_search
from fedcca.merging.contribution import absorb
from fedcca.merging.merger import Merger, MergeResult
from fedcca.merging.selection import FEDERATED_SEARCH, UNLABELLED_DEFAULT
from fedcca.statistics import as_batches


def aligned_parameters(received: Sequence[np.ndarray], trained: nn.Module, config: Mapping[str, Scalar],
                       calibration: torch.Tensor | Iterable[Any], *, limit: float | None = 8.0,
                       device: torch.device | str | None = None) -> list[np.ndarray]:
    """A legacy client's ``FitRes`` parameters: its weights, then (when ``config`` asks) its contribution.

    Args:
        received: The parameters of the ``FitIns`` (the global model, in state-dict order).
        trained: The trained model.
        config: The ``FitIns`` config.
        calibration: The public calibration inputs.
        limit: SecAgg+'s ``clipping_range``: a value beyond it would be clipped silently, so it is
            refused here (None: no check, e.g. without secure aggregation).
        device: Where to run.

    Raises:
        ValueError: A value beyond ``limit`` (naming the entry), a malformed search.
    """
    state = trained.state_dict()
    # integer buffers (BatchNorm's batch counters) are never averaged: sent as 0, clipping never meets them
    out = {key: value.detach().cpu().numpy() if value.is_floating_point() else np.zeros(tuple(value.shape), np.int64)
           for key, value in state.items()}
    if ALIGN_KEY in config:
        if len(received) != len(state):
            raise ValueError(f"aligned_parameters: {len(received)} received arrays for a model of {len(state)}")
        reference = copy.deepcopy(trained)
        reference.load_state_dict({key: torch.as_tensor(np.asarray(array)) for key, array in zip(state, received)})
        merger = contribution_merger(reference, calibration, search_from_json(str(config[ALIGN_KEY])), device=device)
        weights, aligned = reply_parts(merger, trained)  # the first form's weights replace the plain ones
        out = {key: value.numpy() if value.is_floating_point() else out[key] for key, value in weights.items()}
        out.update({name: value.numpy() for name, value in aligned.items()})
    if limit is not None:
        for name, array in out.items():
            if array.size and float(np.abs(array).max()) > limit:
                raise ValueError(f"'{name}' holds {float(np.abs(array).max()):.3g}, beyond SecAgg+'s clipping range "
                                 f"{limit:g}: raise clipping_range (and this limit) or scale the model")
    return list(out.values())


class SecureCCAMerge(LegacyFedAvg):
    """CCA Merge from the clients' summed contributions, as a legacy strategy for ``SecAggPlusWorkflow``.

    Args:
        model_fn: Builds a fresh model of the federated architecture.
        calibration: Public calibration inputs (the clients' too).
        config: Merge configuration(s); None: the default search with ``holdout``, CCA shrunk half-way without.
        holdout: Labelled public ``(inputs, labels)`` to choose among candidates.
        device: Where merges run.
        batch_size: Calibration batch size.
        **kwargs: Flower's legacy ``FedAvg`` keywords (``min_fit_clients``, ``fraction_evaluate``, ...).
    """

    def __init__(self, model_fn: Any, calibration: torch.Tensor | Iterable[Any],
                 config: MergeConfig | MergeSearch | str | None = None, *,
                 holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
                 device: torch.device | str | None = None, batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_fn, self.holdout, self.device, self.batch_size = model_fn, holdout, device, batch_size
        self.search = resolve_search(config, default=FEDERATED_SEARCH if holdout is not None else UNLABELLED_DEFAULT)
        self.calibration = list(as_batches(calibration, batch_size))
        model = model_fn()
        self.keys = list(model.state_dict())
        self.layout = aligned_layout(contribution_merger(model, self.calibration, self.search, device=device))
        self.results: list[MergeResult] = []
        self._global: nn.Module | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's fit instructions, each asking the client to align itself to ``parameters``."""
        self._global = self._model(parameters_to_ndarrays(parameters))
        instructions = super().configure_fit(server_round, parameters, client_manager)
        text = search_to_json(self.search)
        return [(proxy, FitIns(fit.parameters, {**fit.config, ALIGN_KEY: text})) for proxy, fit in instructions]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The chosen merge of the (securely) averaged contributions."""
        averaged, metrics = super().aggregate_fit(server_round, results, failures)
        if averaged is None or self._global is None:
            return averaged, metrics
        arrays = parameters_to_ndarrays(averaged)
        expected = len(self.keys) + len(self.layout)
        if len(arrays) != expected:
            raise ValueError(f"SecureCCAMerge: the averaged parameters hold {len(arrays)} arrays, expected {expected} "
                             "(weights, then the contribution): do the clients call aligned_parameters?")
        weights = {key: torch.as_tensor(np.asarray(a)) for key, a in zip(self.keys, arrays)}
        aligned = {name: torch.as_tensor(np.asarray(a, dtype=np.float32)).reshape(shape)
                   for (name, shape), a in zip(self.layout.items(), arrays[len(self.keys):])}
        merger = Merger(self._global, self.calibration, self.search, holdout=self.holdout, device=self.device,
                        batch_size=self.batch_size)
        absorb(merger, with_reply_weights(reply_weight_names(merger), aligned, weights), 1.0)
        result = merger.finish()
        self.results.append(result)
        state = result.model.state_dict()
        return ndarrays_to_parameters([state[key].cpu().numpy() for key in self.keys]), \
            {**metrics, "merge-choice": result.config.label()}

    def _model(self, arrays: Sequence[np.ndarray]) -> nn.Module:
        model = self.model_fn()
        template = model.state_dict()
        model.load_state_dict({key: torch.as_tensor(np.asarray(a)).to(template[key].dtype)
                               for key, a in zip(self.keys, arrays)})
        return model

