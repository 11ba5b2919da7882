"""Run a reference and a candidate model side by side in onnxruntime and measure the difference."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.errors import CannotRun
from onnxcompress.runner import Runner, observe_shapes  # noqa: F401 (the sessions live there)


@dataclass
class OutputMetrics:
    """Differences on one output, accumulated over every feed."""

    name: str
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    top1_agreement: float | None = None  # argmax over the last axis, when it is a class axis
    kl: float | None = None  # KL(ref || cand) of softmax(x / T) over the last axis


@dataclass
class Validation:
    outputs: list[OutputMetrics]
    feeds: int
    latency_ms_reference: float | None = None
    latency_ms_candidate: float | None = None
    temperature: float = 1.0
    notes: list[str] = field(default_factory=list)

    @property
    def latency_ratio(self) -> float | None:
        """Candidate latency over reference latency (< 1 is faster)."""
        if not self.latency_ms_reference or self.latency_ms_candidate is None:
            return None
        return self.latency_ms_candidate / self.latency_ms_reference

    @property
    def worst_rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def min_agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None


class _Accumulator:
    """Running sums for one output, so feeds are never all kept in memory."""

    def __init__(self, name: str, temperature: float) -> None:
        self.name, self.temperature = name, temperature
        self.max_abs = self.abs_sum = self.diff_sq = self.ref_sq = self.cand_sq = self.dot = 0.0
        self.count = self.rows = self.agree = 0
        self.kl_sum = 0.0
        self.classy = True

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise CannotRun(f"output {self.name!r}: shape {cand.shape} differs from {ref.shape}")
        r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        diff = r - c
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.abs_sum += float(np.abs(diff).sum())
        self.diff_sq += float(diff @ diff)
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.dot += float(r @ c)
        self.count += r.size
        self.classy = self.classy and ref.ndim >= 2 and ref.shape[-1] >= 2
        if self.classy:
            self._add_classes(ref.astype(np.float64), cand.astype(np.float64))

    def _add_classes(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref2, cand2 = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        self.rows += len(ref2)
        self.agree += int((ref2.argmax(-1) == cand2.argmax(-1)).sum())
        p, q = _probabilities(ref2, self.temperature), _probabilities(cand2, self.temperature)
        kl = np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=-1)
        self.kl_sum += float(kl.sum())

    def result(self) -> OutputMetrics:
        denominator = np.sqrt(self.ref_sq * self.cand_sq)
        classy = self.classy and self.rows > 0
        return OutputMetrics(
            name=self.name,
            max_abs=self.max_abs,
            mean_abs=self.abs_sum / max(self.count, 1),
            rel_l2=float(np.sqrt(self.diff_sq / self.ref_sq))
            if self.ref_sq
            else float(self.diff_sq > 0),
            cosine=float(self.dot / denominator) if denominator else float(self.diff_sq == 0),
            top1_agreement=self.agree / self.rows if classy else None,
            kl=self.kl_sum / self.rows if classy else None,
        )


def _probabilities(x: np.ndarray, temperature: float) -> np.ndarray:
    """Rows that already are distributions stay as they are; logits go through softmax(x/T)."""
    if x.min() >= 0 and np.allclose(x.sum(-1), 1.0, atol=1e-3):
        return x
    z = x / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def compare(
    reference: Runner,
    candidate: Runner,
    feeds: Sequence[Feed],
    *,
    temperature: float = 1.0,
    latency_runs: int = 20,
) -> Validation:
    """Metrics per output over all ``feeds``, and the latency of both on the first feed."""
    if not feeds:
        raise CannotRun("no data to validate with")
    accumulators = [_Accumulator(n, temperature) for n in reference.output_names]
    for feed in feeds:
        for acc, ref, cand in zip(accumulators, reference.run(feed), candidate.run(feed)):
            acc.add(np.asarray(ref), np.asarray(cand))
    validation = Validation([a.result() for a in accumulators], len(feeds), temperature=temperature)
    if latency_runs > 0:
        ref_ms, cand_ms = measure_latency([reference, candidate], feeds[0], latency_runs)
        validation.latency_ms_reference, validation.latency_ms_candidate = ref_ms, cand_ms
    return validation


def measure_latency(runners: Sequence[Runner], feed: Feed, runs: int) -> list[float]:
    """Median milliseconds per run for each runner, interleaved so machine noise hits all alike."""
    for runner in runners:  # warm up: first runs allocate and autotune
        runner.run(feed)
        runner.run(feed)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(runs):
        for runner, bucket in zip(runners, times):
            start = time.perf_counter()
            runner.run(feed)
            bucket.append((time.perf_counter() - start) * 1000)
    return [float(np.median(bucket)) for bucket in times]


def validate(
    reference: ir.Model | str | Path,
    candidate: ir.Model | str | Path,
    feeds: Sequence[Feed],
    *,
    temperature: float = 1.0,
    latency_runs: int = 20,
) -> Validation:
    """Compare two models in onnxruntime on ``feeds``; see :class:`Validation`."""
    ref = Runner(reference, "reference model")
    try:
        cand = Runner(candidate, "candidate model")
        try:
            return compare(ref, cand, feeds, temperature=temperature, latency_runs=latency_runs)
        finally:
            cand.close()
    finally:
        ref.close()


def gate_failures(
    validation: Validation,
    max_rel_error: float | None = None,
    min_agreement: float | None = None,
    outputs: Iterable[str] | None = None,
) -> list[str]:
    """One line per missed gate; empty when every gate holds. Gates fail closed: a figure
    that is not a number (NaN from a broken model) misses, and so does a gated output the
    model does not have."""
    chosen = set(outputs) if outputs else None
    names = {metrics.name for metrics in validation.outputs}
    failures = [f"no output named {name!r}" for name in sorted((chosen or set()) - names)]
    for metrics in validation.outputs:
        if chosen is not None and metrics.name not in chosen:
            continue
        error, agreement = metrics.rel_l2, metrics.top1_agreement
        if max_rel_error is not None and not error <= max_rel_error:  # NaN misses too
            failures.append(
                f"output {metrics.name!r}: relative error {error:.4g} > {max_rel_error:g}"
            )
        if min_agreement is not None and agreement is not None and not agreement >= min_agreement:
            failures.append(
                f"output {metrics.name!r}: top-1 agreement {agreement:.4f} < {min_agreement:g}"
            )
    return failures
