"""Shared test helpers: models from ONNX text, onnxruntime runs, the real-model folder."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so tests can import fixtures.*
    sys.path.insert(0, str(REPO))

REAL = Path(os.environ.get("ONNXCOMPRESS_REAL_DIR", REPO.parent / "shared" / "real"))
FIXTURES = REPO / "fixtures"


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text syntax, checked."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a ModelProto, bytes, path or ir.Model in onnxruntime."""
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def real() -> Path:
    if not REAL.is_dir():
        pytest.fail(f"real models folder missing: {REAL} (set ONNXCOMPRESS_REAL_DIR)")
    return REAL


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _timing_cache_of_the_session(tmp_path_factory):
    """min_speedup's timing cache (onnxcompress/timing_cache.py) in a folder of this test
    session, never the user's: tests neither read timings nor leave them behind. Subprocesses
    (the CLI tests) inherit it."""
    previous = os.environ.get("ONNXCOMPRESS_CACHE_DIR")
    os.environ["ONNXCOMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("timing-cache"))
    yield
    if previous is None:
        os.environ.pop("ONNXCOMPRESS_CACHE_DIR", None)
    else:
        os.environ["ONNXCOMPRESS_CACHE_DIR"] = previous
