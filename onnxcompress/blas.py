"""How many threads numpy's BLAS may use while a recipe runs: one, unless
``ONNXCOMPRESS_BLAS_THREADS`` says otherwise.

Why one: the passes' linear algebra is on matrices of a few hundred to a few thousand rows
(Gram matrices, Cholesky factors, SVDs of one layer), interleaved with onnxruntime runs that
have threads of their own. OpenBLAS threads wait for each other at every call; when anything
else wants the cores (onnxruntime's pool, another worker of a batch, a container given fewer
cores than the host shows), a waiting thread is descheduled and every small call stalls.
Measured on a 2-core machine with one other busy process: a 384×384 Cholesky took 496 ms with
OpenBLAS's 2 threads and 2.9 ms with one; the codebook pass with ``data_aware=true`` on
EfficientNet-Lite1 (100 images) took 50 s against 28 s."""

from __future__ import annotations

import os
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

ENVIRONMENT_VARIABLE = "ONNXCOMPRESS_BLAS_THREADS"


def blas_threads() -> int:
    """The BLAS thread count for passes: the environment's, when it is a positive integer."""
    text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1


@contextmanager
def limited_blas():
    """Run the block with BLAS held to ``blas_threads()`` threads (restored afterwards)."""
    with threadpool_limits(limits=blas_threads(), user_api="blas"):
        yield
