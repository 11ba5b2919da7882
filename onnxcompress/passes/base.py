"""The pass contract: a CompressionPass rewrites a model in place and reports every layer."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import Shapes, node_label

if TYPE_CHECKING:
    from onnxcompress.validate import Runner


class Skip(Exception):
    """Raised while handling one layer: leave it as it is, for this reason."""


@dataclass
class LayerReport:
    """What a pass did to one candidate layer, or why it left it alone."""

    node: str
    op_type: str
    action: str  # "rewritten" or "skipped"
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    weight_error: float | None = None  # relative Frobenius error ||W - W'|| / ||W||
    output_error: float | None = None  # relative error of the layer output on calibration data

    @classmethod
    def skipped(cls, node: ir.Node, reason: str) -> LayerReport:
        return cls(node_label(node), node.op_type, "skipped", reason=reason)

    @classmethod
    def rewritten(
        cls,
        node: ir.Node,
        detail: dict[str, Any] | None = None,
        *,
        original: np.ndarray | None = None,
        restored: np.ndarray | None = None,
        params: tuple[int, int] = (0, 0),
        nbytes: tuple[int, int] = (0, 0),
        macs: tuple[int | None, int | None] = (None, None),
        output_error: float | None = None,
    ) -> LayerReport:
        """A rewritten layer: ``params``, ``nbytes`` and ``macs`` as (before, after); the
        weight error is measured between the ``original`` weight and the ``restored`` one
        (what the new graph computes), when both are given."""
        error = None if original is None or restored is None else relative_error(original, restored)
        return cls(
            node_label(node),
            node.op_type,
            "rewritten",
            detail=dict(detail or {}),
            params_before=params[0],
            params_after=params[1],
            bytes_before=nbytes[0],
            bytes_after=nbytes[1],
            macs_before=macs[0],
            macs_after=macs[1],
            weight_error=error,
            output_error=output_error,
        )


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """||reference − approximation|| / ||reference|| (Frobenius, in float64); 0 for a zero
    reference."""
    reference = np.asarray(reference, np.float64)
    norm = float(np.linalg.norm(reference))
    if norm == 0:
        return 0.0
    return float(np.linalg.norm(reference - np.asarray(approximation, np.float64))) / norm


@dataclass
class PassReport:
    name: str
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # targets the pass could not reach
    allocation: list[dict[str, Any]] = field(default_factory=list)  # per group, with a target

    @property
    def rewritten(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action == "rewritten"]

    def totals(self) -> dict[str, int]:
        """Sums over the rewritten layers (skipped layers are unchanged by definition)."""
        keys = ("params_before", "params_after", "bytes_before", "bytes_after")
        sums = {key: sum(getattr(layer, key) for layer in self.rewritten) for key in keys}
        for key in ("macs_before", "macs_after"):
            sums[key] = sum(getattr(layer, key) or 0 for layer in self.rewritten)
        sums["layers_rewritten"] = len(self.rewritten)
        sums["layers_skipped"] = len(self.layers) - len(self.rewritten)
        return sums


@dataclass
class PassContext:
    """What passes share: data, the teacher model, shapes, the seed, progress."""

    shapes: Shapes = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)  # symbolic input sizes (--dim)
    calibration: Sequence[dict[str, np.ndarray]] | None = None  # calibration.FileFeeds or a list
    synthetic_calibration: bool = False  # feeds are seeded noise, not the user's data
    teacher: Runner | None = None  # an onnxruntime session on the original model
    seed: int = 0
    progress: Callable[[str], None] | None = None


class CompressionPass:
    """Base class. Subclasses set ``name``, a frozen ``Config`` dataclass and ``run``.

    The first line of a subclass docstring states its rewrite; ``onnxcompress passes`` shows it.
    """

    name: ClassVar[str]

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        """Whether ``node`` is a candidate this pass would try to rewrite (for ``inspect``)."""
        return False

    def required_opset(self, model: ir.Model) -> int | None:
        """The default-domain opset this pass needs for ``model``, if newer than it has."""
        return None

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        raise NotImplementedError


def name_matches(node: ir.Node, patterns: tuple[str, ...]) -> bool:
    """True when one of the glob ``patterns`` matches the node's name, its report
    label (``Conv(270)`` for an unnamed node, as many exporters leave them) or an output's name."""
    names = {node.name or "", node_label(node), *(v.name or "" for v in node.outputs)}
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def check_fields(config: Any, rules: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise ValueError naming the first field whose value breaks its rule."""
    for key, (ok, expectation) in rules.items():
        value = getattr(config, key)
        if value is not None and not ok(value):
            raise ValueError(f"{key}={value!r}: must be {expectation}")
