"""CompressionReport: what every pass did, what the model costs before and after, how it
validates. ``to_dict`` is the stable JSON schema (documented in README); ``to_text`` a table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from onnxcompress.passes.base import PassReport
from onnxcompress.validate import Validation
from onnxcompress.version import __version__

SCHEMA = "onnxcompress.report/1"


@dataclass
class ModelStats:
    params: int
    weight_bytes: int
    macs: int
    file_bytes: int | None = None  # model file plus external data, when on disk


@dataclass
class CompressionReport:
    before: ModelStats
    after: ModelStats | None = None
    normalization: list[str] = field(default_factory=list)
    passes: list[PassReport] = field(default_factory=list)
    validation: Validation | None = None
    gate_failures: list[str] = field(default_factory=list)
    gates: dict[str, Any] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    source: str | None = None
    output: str | None = None
    # what the run started from (batch: the input's SHA-256s and the recipe fingerprint)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "tool_version": __version__,
            "source": self.source,
            "output": self.output,
            "input_shapes": self.input_shapes,
            "before": dataclasses.asdict(self.before),
            "after": dataclasses.asdict(self.after) if self.after else None,
            "normalization": self.normalization,
            "passes": [_pass_dict(p) for p in self.passes],
            "validation": validation_dict(self.validation) if self.validation else None,
            "gates": {**self.gates, "passed": self.passed, "failures": self.gate_failures},
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def to_text(self) -> str:
        lines = [f"onnxcompress report: {self.source or 'model'}"]
        lines += [f"  note: {note}" for note in self.normalization]
        for report in self.passes:
            lines += _pass_table(report)
        lines += _totals_table(self.before, self.after)
        if self.validation:
            lines += validation_table(self.validation)
        if self.gates or self.gate_failures:
            verdict = "passed" if self.passed else "FAILED"
            lines.append(
                f"gates {verdict}: " + ", ".join(f"{k}={v}" for k, v in self.gates.items())
            )
            lines += [f"  {failure}" for failure in self.gate_failures]
        return "\n".join(lines)


def _pass_dict(report: PassReport) -> dict[str, Any]:
    return {
        "name": report.name,
        "config": report.config,
        "notes": report.notes,
        "totals": report.totals(),
        "layers": [dataclasses.asdict(layer) for layer in report.layers],
        **({"allocation": report.allocation} if report.allocation else {}),
        **({"missed": report.missed} if report.missed else {}),
    }


def validation_dict(validation: Validation) -> dict[str, Any]:
    return {
        "feeds": validation.feeds,
        "temperature": validation.temperature,
        "latency_ms_reference": validation.latency_ms_reference,
        "latency_ms_candidate": validation.latency_ms_candidate,
        "latency_ratio": validation.latency_ratio,
        "outputs": [dataclasses.asdict(o) for o in validation.outputs],
        "notes": validation.notes,
    }


def _fmt(value: float | int | None, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """The first ``left`` columns left-aligned (text), the rest right-aligned (numbers)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [
            str(c).ljust(w) if i < left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _pass_table(report: PassReport) -> list[str]:
    options = ", ".join(
        f"{k}={','.join(v) if isinstance(v, (tuple, list)) else v}"
        for k, v in report.config.items()
        if v not in (None, ())
    )
    lines = ["", f"pass {report.name} ({options})"]
    lines += [f"  note: {note}" for note in report.notes]
    # With calibration data the output error is the figure that matters: a data-aware fit
    # may move weights far in directions the data never excites (a large weight error).
    measured = any(layer.output_error is not None for layer in report.layers)
    rows = []
    for layer in report.layers:
        if layer.action == "skipped":
            rows.append([layer.node, layer.op_type, "skipped: " + (layer.reason or "")])
            continue
        what = ", ".join(f"{k}={v}" for k, v in layer.detail.items() if k != "nodes")
        rows.append(
            [
                layer.node,
                layer.op_type,
                what,
                f"{layer.params_before:,} -> {layer.params_after:,}",
                f"{_fmt(layer.macs_before)} -> {_fmt(layer.macs_after)}",
                _fmt(layer.weight_error, ".4f"),
                *([_fmt(layer.output_error, ".4f")] if measured else []),
            ]
        )
    if not rows:
        return [*lines, "  no candidate layers"]
    header = ["layer", "op", "done", "params", "MACs", "weight err"]
    header += ["output err"] if measured else []
    rows = [row + [""] * (len(header) - len(row)) for row in rows]  # skipped: blank figures
    return lines + table(header, rows, left=3) + _allocation_table(report.allocation)


def _allocation_table(allocation: list[dict[str, Any]]) -> list[str]:
    """A target's allocation: per channel group, the channels kept and the probe's figures."""
    if not allocation:
        return []
    rows = [
        [
            row["group"][:60],
            f"{row['kept']}/{row['channels']}",
            _fmt(row["probe_error"], ".4g"),
            _fmt(row["saving"], ".4g"),
        ]
        for row in allocation
    ]
    return ["", "  allocation", *table(["group", "kept", "probe error", "saves"], rows)]


def _totals_table(before: ModelStats, after: ModelStats | None) -> list[str]:
    rows = []
    for key, label in (
        ("params", "params"),
        ("weight_bytes", "weight bytes"),
        ("macs", "MACs"),
        ("file_bytes", "file bytes"),
    ):
        old = getattr(before, key)
        new = getattr(after, key) if after else None
        ratio = f"{old / new:.2f}x" if old and new else "-"
        rows.append([label, _fmt(old), _fmt(new), ratio])
    return ["", *table(["model", "before", "after", "smaller by"], rows)]


def validation_table(validation: Validation) -> list[str]:
    rows = [
        [
            o.name,
            f"{o.max_abs:.4g}",
            f"{o.rel_l2:.4g}",
            f"{o.cosine:.6f}",
            _fmt(o.top1_agreement, ".4f"),
            _fmt(o.kl, ".3g"),
        ]
        for o in validation.outputs
    ]
    lines = ["", f"validation on {validation.feeds} feed(s) in onnxruntime"]
    lines += table(["output", "max abs", "rel L2", "cosine", "top-1 agree", "KL"], rows)
    if validation.latency_ratio is not None:
        lines.append(
            f"latency: {validation.latency_ms_reference:.3f} ms -> "
            f"{validation.latency_ms_candidate:.3f} ms (ratio {validation.latency_ratio:.2f})"
        )
    lines += [f"  note: {note}" for note in validation.notes]
    return lines
