"""BLAS threads while a recipe runs (``onnxcompress/blas.py``): one by default, the
environment's count when it says so, and the caller's setting restored afterwards."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from onnxcompress import Options, compress
from onnxcompress.blas import ENVIRONMENT_VARIABLE, blas_threads
from onnxcompress.passes.prune.sparsity import Sparsity
from tests.test_runner import chain_model


def _blas_threads_now() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, 1), ("2", 2), ("0", 1), ("many", 1), (" 3 ", 3)]
)
def test_the_thread_count_comes_from_the_environment_when_it_is_a_positive_integer(
    monkeypatch, setting, expected
):
    if setting is None:
        monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, setting)
    assert blas_threads() == expected


def test_passes_run_with_the_blas_threads_limited_and_the_callers_setting_comes_back(
    monkeypatch,
):
    if not _blas_threads_now():
        pytest.skip("numpy's BLAS is not one threadpoolctl controls")
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    seen = []
    original_run = Sparsity.run

    def recording_run(self, model, ctx):
        seen.append(_blas_threads_now())
        return original_run(self, model, ctx)

    monkeypatch.setattr(Sparsity, "run", recording_run)
    with threadpool_limits(limits=2, user_api="blas"):
        compress(ir.from_proto(chain_model()), ["sparsity:ratio=0.5"], options=Options())
        after = _blas_threads_now()
    assert seen == [{1}]
    assert after == {2}
