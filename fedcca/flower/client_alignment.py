"""Client-side alignment: a client aligns its trained model to the model it received, the server only sums.

From round 2 on the reference of the all-to-one alignment is the global model the server has
just broadcast, which every client holds with the public calibration set. With
``CCAMerge(alignment="client")`` the train message carries the merge search (:data:`ALIGN_KEY`,
JSON data: configuration fields and values, never code); the client computes its additive share of
every candidate's merge (:func:`fedcca.merging.contribution.contribution`: aligned weights, REPAIR's
and BatchNorm's targets). The first form's weights travel as the reply's own weights (``arrays``,
what the reply screen measures and FedAvg would average): the plain weights when the search's
first candidate is FedAvg's, the aligned ones when every candidate aligns (a single ``"cca"``
merge then costs FedAvg's bytes plus the targets). Everything else goes in the ArrayRecord
:data:`ALIGNED_KEY`; a form that aligns nothing is not sent twice when the weights are plain.

A user's own ClientApp adds this in one line before replying (a no-op when not asked)::

    content = add_alignment(content, msg, model, calibration)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from fedcca.flower.protocol import (
    ALIGNED_RECORD_KEY,
    CONFIG_KEY,
    WEIGHTS_KEY,
    InvalidReplyError,
)
from fedcca.flower.wire_statistics import decode_declared
from fedcca.merging.config import MergeConfig, MergeSearch
from fedcca.merging.contribution import contribution, forms
from fedcca.merging.merger import Merger

ALIGN_KEY = "fedcca.align-to-global"
"""Config entry of a train message asking for client-side alignment: the merge search as JSON."""
ALIGNED_KEY = ALIGNED_RECORD_KEY
"""ArrayRecord of a train reply holding the client's contribution (float32 entries)."""
_MAX_SEARCH_JSON = 64 * 1024  # a search is a few hundred bytes


def search_to_json(search: MergeSearch) -> str:
    """``search`` as the JSON a train message carries (fields and values only)."""
    return json.dumps({"base": search.base.to_json(), "grid": [[name, list(values)] for name, values in search.grid],
                       "min_z": search.min_z, "description": search.description})


def search_from_json(text: str) -> MergeSearch:
    """The search a train message asks for; ValueError naming what is wrong (data is never run)."""
    if not isinstance(text, str) or len(text) > _MAX_SEARCH_JSON:
        raise ValueError(f"'{ALIGN_KEY}' must be a JSON string of at most {_MAX_SEARCH_JSON} characters")
    try:
        data = json.loads(text)
        base = dict(data["base"])
        if base.get("points") is not None:
            base["points"] = tuple(base["points"])
        grid = tuple((str(name), tuple(values)) for name, values in data["grid"])
        return MergeSearch(MergeConfig(**base), grid, float(data["min_z"]), str(data.get("description", "")))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"'{ALIGN_KEY}' is not a merge search: {type(err).__name__}: {err}") from err


def contribution_merger(reference: nn.Module, calibration: torch.Tensor | Iterable[Any], search: MergeSearch, *,
                        device: torch.device | str | None = None, batch_size: int = 256) -> Merger:
    """A fresh merger onto ``reference`` that computes one contribution (see :func:`aligned_entries`)."""
    return Merger(reference, calibration, search, device=device, batch_size=batch_size, contributes=True)


def aligned_entries(merger: Merger, model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s contribution without the weights that travel as the reply's own (see :func:`reply_parts`)."""
    return reply_parts(merger, model)[1]


def reply_parts(merger: Merger, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s contribution split as a reply carries it: ``(weights, aligned entries)``.

    ``weights`` is the first form's weights as a whole state dict (``model``'s own non-floating
    entries, e.g. BatchNorm's batch counters, kept; dtypes as ``model``'s): what the reply sends as
    its ``arrays``. The aligned entries are the rest, without the forms whose weights equal those.
    """
    entries = contribution(merger, model)
    shared = _forms_in_weights(merger)
    state = model.state_dict()
    weights = {key: entries[f"form0/weights/{key}"].to(value.dtype) if value.is_floating_point() else value.detach().cpu()
               for key, value in state.items()}
    aligned = {name: value for name, value in entries.items()
               if not any(name.startswith(f"form{number}/weights/") for number in shared)}
    return weights, aligned


def add_alignment(content: RecordDict, message: Message, model: nn.Module, calibration: torch.Tensor | Iterable[Any],
                  *, device: torch.device | str | None = None) -> RecordDict:
    """``content`` with the client's aligned contribution when ``message`` asks for it (else unchanged).

    Args:
        content: The train reply's content (weights and metrics).
        message: The train message (its ``arrays`` are the reference; its config may hold :data:`ALIGN_KEY`).
        model: The trained model (not modified).
        calibration: The public calibration inputs, normalised as in training.
        device: Where to run (None: CUDA if present).

    Raises:
        ValueError: The message's search is malformed, or its weights do not fit ``model``.
    """
    config = message.content.config_records.get(CONFIG_KEY)
    if config is None or ALIGN_KEY not in config:
        return content
    search = search_from_json(config[ALIGN_KEY])  # type: ignore[arg-type]
    reference = copy.deepcopy(model)
    reference.load_state_dict(message.content.array_records[WEIGHTS_KEY].to_torch_state_dict())
    merger = contribution_merger(reference, calibration, search, device=device)
    weights, aligned = reply_parts(merger, model)
    content[WEIGHTS_KEY] = ArrayRecord({key: value.contiguous() for key, value in weights.items()})
    content[ALIGNED_KEY] = ArrayRecord({name: value.contiguous() for name, value in aligned.items()})
    return content


def decode_aligned(record: ArrayRecord, layout: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A reply's contribution, checked against ``layout`` before anything is decoded.

    Raises:
        InvalidReplyError: A missing or unexpected entry, a declared dtype/shape/size that differs,
            or non-finite values (the first one found is named).
    """
    missing, extra = [k for k in layout if k not in record], [k for k in record if k not in layout]
    if missing or extra:
        raise InvalidReplyError(f"aligned entries differ from the search's: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
    out = {}
    for name, shape in layout.items():
        array = decode_declared(record[name], name, shape, (np.dtype(np.float32),), InvalidReplyError, "aligned entry")
        out[name] = torch.from_numpy(array)
    return out


def aligned_layout(merger: Merger) -> dict[str, tuple[int, ...]]:
    """The names and shapes of what a client sends in :data:`ALIGNED_KEY` for ``merger``'s candidates.

    Args:
        merger: A fresh merger from :func:`contribution_merger` (used up: its reference contributes itself).
    """
    return {name: tuple(value.shape) for name, value in aligned_entries(merger, merger.reference).items()}


def reply_weight_names(merger: Merger) -> dict[str, list[str]]:
    """For each of the model's floating-point entries, the contribution entries a reply's own weights stand
    for (``form<k>/weights/<key>`` of every form in them; whatever dtype a secure sum hands back for the
    counters is left out). Computed once per round: :func:`with_reply_weights` uses it for every reply."""
    numbers = _forms_in_weights(merger)
    return {key: [f"form{number}/weights/{key}" for number in numbers]
            for key, value in merger.template.items() if value.is_floating_point()}


def with_reply_weights(names: Mapping[str, list[str]], aligned: Mapping[str, torch.Tensor],
                       weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole contribution: ``aligned`` plus the reply's ``weights`` under every name
    :func:`reply_weight_names` gives them."""
    whole = dict(aligned)
    for key, entries in names.items():
        if key in weights:
            whole.update(dict.fromkeys(entries, weights[key]))
    return whole


def _forms_in_weights(merger: Merger) -> list[int]:
    """The forms whose weights are the reply's own: the first, and, when it aligns nothing, every form that
    aligns nothing (their weights are all the plain ones)."""
    plain = [number for number, members in enumerate(forms(merger))
             if not merger.candidates[members[0]].config.aligns]
    return plain if plain[:1] == [0] else [0]
