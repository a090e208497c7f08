"""One BLAS thread in the merges' decompositions (fedcca.blas)."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fedcca.methods.cca as cca_module
from fedcca.blas import one_blas_thread
from fedcca.merging.merger import merge
from tests.tiny_models import calibration, make_tiny


def _blas_threads() -> dict[str, int]:
    return {info["filepath"]: info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_one_blas_thread_limits_numpy_and_scipy_blas_and_restores_them() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and set(before.values()) == {2}
        with one_blas_thread():
            assert set(_blas_threads().values()) == {1}
        assert _blas_threads() == before


def test_a_merges_decompositions_run_with_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[int]] = []
    original = cca_module._svd

    def svd(matrix, point):  # noqa: ANN001, ANN202
        seen.append(set(_blas_threads().values()))
        return original(matrix, point)

    monkeypatch.setattr(cca_module, "_svd", svd)
    with threadpool_limits(limits=2, user_api="blas"):
        merge([make_tiny(seed=1), make_tiny(seed=2)], calibration(64, seed=0), "cca")
        assert set(_blas_threads().values()) == {2}
    assert seen and all(threads == {1} for threads in seen)
