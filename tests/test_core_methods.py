"""A merge method is one module: registering it makes it usable everywhere, with its own parameters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import fedcca
from fedcca.app.task import strategies
from fedcca.cli import _parser
from fedcca.merging.config import MergeConfig, MergeSearch, merge_keywords, resolve_search
from fedcca.methods.common import identity_transform
from fedcca.methods.registry import ALIGNERS, Aligner, AlignmentJob, Parameter, number, register, unregister
from fedcca.spec.alignment import Transform
from tests.tiny_models import calibration, make_tiny

CALLS: list[dict] = []


def _halfway(job: AlignmentJob) -> dict[str, Transform]:
    """Identity transforms; records what the method was given."""
    CALLS.append(dict(job.options))
    return {p.name: identity_transform(p.size) for p in job.spec.points}


@pytest.fixture
def dummy() -> Iterator[Aligner]:
    """What a new module of fedcca.methods would do at import: one register() call."""
    aligner = register(Aligner("dummy", True, _halfway, "a test method", parameters=(
        Parameter("strength", 1.0, number("strength", 0.0, 2.0), "how strongly", label="s"),)))
    CALLS.clear()
    yield aligner
    unregister("dummy")


def test_a_registered_method_is_a_merge_config_with_its_own_parameter(dummy: Aligner) -> None:
    config = MergeConfig("dummy", strength=0.5)
    assert config.strength == 0.5 and config.method_options() == {"strength": 0.5}
    assert config.label() == "dummy s=0.5" and MergeConfig("dummy").label() == "dummy"
    assert "strength" in merge_keywords()
    with pytest.raises(ValueError, match=r"strength must be in \[0, 2\], got 3"):
        MergeConfig("dummy", strength=3)
    search = resolve_search("dummy", strength=0.25)
    assert search.candidates() == [MergeConfig("dummy", strength=0.25)]
    grid = MergeSearch(MergeConfig("dummy"), (("strength", (0.5, 1.5)),))
    assert [c.label() for c in grid.candidates()] == ["dummy s=0.5", "dummy s=1.5"]


def test_a_registered_method_merges_and_is_offered_by_the_cli_and_the_run_config(dummy: Aligner) -> None:
    models, x = [make_tiny(1, batchnorm=False), make_tiny(2, batchnorm=False)], calibration(16)
    merged = fedcca.merge(models, x, "dummy", strength=0.5, zero_dead=False)
    assert CALLS == [{"strength": 0.5}] * len(CALLS) and len(CALLS) == 1  # the reference is not aligned
    direct = fedcca.merge(models, x, "direct")
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value)  # identity transforms: the plain average
    help_text = _parser().format_help() + _parser()._subparsers._group_actions[0].choices["merge"].format_help()
    assert "--strength" in help_text and "dummy" in help_text
    assert "dummy" in strategies()


def test_unregistered_methods_and_parameters_are_refused() -> None:
    assert "dummy" not in ALIGNERS
    with pytest.raises(ValueError, match="unknown method 'dummy'"):
        MergeConfig("dummy")
    with pytest.raises(TypeError, match=r"unknown merge option\(s\) \['strength'\]"):
        MergeConfig("cca", strength=1.0)


def test_a_parameter_name_means_one_thing(dummy: Aligner) -> None:
    with pytest.raises(ValueError, match="parameter 'strength' is declared differently"):
        register(Aligner("dummy2", True, _halfway, "", parameters=(Parameter("strength", 2.0, float, "other"),)))
    with pytest.raises(ValueError, match="already registered"):
        register(dummy)
