"""What optimize is asked for: a file-size target, a tolerance (gates on the outputs, a floor
under the user's metric) and the user's metric itself."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcompress.errors import BadOption, first_line
from onnxcompress.pipeline import Gates

_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """A file size: ``ratio`` times smaller than the original, or at most ``nbytes``."""

    ratio: float | None = None
    nbytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        key, _, value = text.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "size" and _RATIO.match(value):
            ratio = float(_RATIO.match(value).group(1))
            if ratio < 1:
                raise BadOption(f"--target {text}: a ratio must be at least 1x")
            return cls(ratio=ratio)
        if key == "bytes" and value.isdigit() and int(value) > 0:
            return cls(nbytes=int(value))
        if key == "latency":
            raise BadOption(
                f"--target {text}: latency targets are not built yet; optimize reaches "
                "size targets (size=8x, bytes=N)"
            )
        raise BadOption(f"--target {text}: give size=RATIOx (size=8x) or bytes=N")

    def size_option(self, factor: float = 1.0) -> str:
        """The codebook pass's ``size=`` for this target made ``factor`` times harder."""
        if self.ratio is not None:
            return f"{self.ratio * factor:g}x"
        return str(int(self.nbytes / factor))

    def goal_bytes(self, original: int, factor: float = 1.0) -> float:
        if self.ratio is not None:
            return original / (self.ratio * factor)
        return self.nbytes / factor

    def words(self) -> str:
        return f"size={self.ratio:g}x" if self.ratio is not None else f"bytes={self.nbytes}"


@dataclass(frozen=True)
class Tolerance:
    """What the user can lose: gates on every output (``agreement=``, ``rel=``), and a
    floor under their own metric (``metric=``, or ``drop=D`` for 1 − D)."""

    gates: Gates | None = None
    metric_floor: float | None = None

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Tolerance:
        found: dict[str, float] = {}
        for text in texts:
            key, _, value = text.partition("=")
            key = key.strip().lower()
            if key not in ("agreement", "rel", "metric", "drop"):
                raise BadOption(f"--tolerance {text}: give agreement=A, rel=R, metric=M or drop=D")
            try:
                found[key] = float(value)
            except ValueError:
                raise BadOption(f"--tolerance {text}: {value!r} is not a number") from None
        gates = None
        if "agreement" in found or "rel" in found:
            gates = Gates(max_rel_error=found.get("rel"), min_agreement=found.get("agreement"))
        floor = found.get("metric", 1 - found["drop"] if "drop" in found else None)
        return cls(gates, floor)


@dataclass(frozen=True)
class Metric:
    """The user's measure of a candidate: ``function(reference_outputs, candidate_outputs)``
    on one feed (the outputs as lists, in the model's order) gives a score, 1 when the
    candidate behaves as the original (text agreement, task accuracy relative to the
    original's…); a trial's score is the mean over the validation feeds. When given, it ranks
    the candidates instead of the relative L2 error."""

    function: Callable[[list[np.ndarray], list[np.ndarray]], float]
    name: str = "metric"

    @classmethod
    def from_spec(cls, spec: str) -> Metric:
        """``FILE.py:FUNCTION``: the function loaded from the user's file."""
        path, _, name = spec.rpartition(":")
        if not path or not name.isidentifier():
            raise BadOption(f"--metric {spec}: give FILE.py:FUNCTION")
        if not Path(path).is_file():
            raise BadOption(f"--metric {spec}: no such file {path}")
        try:
            loader = importlib.util.spec_from_file_location("onnxcompress_user_metric", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error it raises is theirs to see
            raise BadOption(f"--metric {spec}: cannot load {path}: {first_line(exc)}") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise BadOption(f"--metric {spec}: {path} has no function {name}")
        return cls(function, name)
