"""Run a reference and a candidate model side by side in onnxruntime and measure the difference."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.calibration import Feed
from onnxcompress.errors import CannotRun
from onnxcompress.model_io import external_folders, save, weight_bytes

logger = logging.getLogger(__name__)

#: Models whose weights exceed this go to onnxruntime through a temporary file, not bytes.
_IN_MEMORY_LIMIT = 1 << 30
#: Lets a model handed over as bytes find external data files in a folder.
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class Runner:
    """An onnxruntime session for a model (ir.Model, serialized bytes or a file), built once.

    ``extra_outputs`` names intermediate values to expose as well: ``run`` still returns the
    model's own outputs, ``capture`` returns the extras by name (activation capture for
    calibration, data-aware passes and shape observation). ``with_outputs`` opens another
    session on the same model with other extras, e.g. on the original model after passes
    have changed the working copy. ``threads`` sets onnxruntime's intra-op threads (default:
    its own choice, one per physical core).
    """

    def __init__(
        self,
        model: ir.Model | bytes | str | Path,
        label: str = "model",
        extra_outputs: Sequence[str] = (),
        external_folder: str | None = None,
        threads: int | None = None,
    ) -> None:
        self._tmp: Path | None = None
        self._folder = external_folder  # where external data lives, for bytes sources
        self._added: list[str] = []
        self.threads = threads
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        # Idle worker threads would otherwise spin after each run, stealing the cores from the
        # next session and skewing side-by-side timings (measure_latency).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            source = self._source(model, options, list(dict.fromkeys(extra_outputs)))
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types
            self.close()
            raise CannotRun(f"onnxruntime cannot run the {label}: {_first_line(exc)}") from None
        names = [o.name for o in self.session.get_outputs()]
        self.extra_outputs = [n for n in extra_outputs if n in names]
        self.output_names = names[: len(names) - len(self._added)]
        self.label = label

    def _source(self, model, options: ort.SessionOptions, extra: list[str]) -> str | bytes:
        if isinstance(model, ir.Model):
            model = self._materialize(model)
        self._origin: str | bytes = model if isinstance(model, bytes) else str(model)
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model) if extra else None
        else:
            self._folder = self._folder or str(Path(model).resolve().parent)
            proto = onnx.load(str(model), load_external_data=False) if extra else None
        if self._folder:
            options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, self._folder)
        if proto is None:
            return self._origin
        return self._with_outputs(proto, extra).SerializeToString()

    def _materialize(self, model: ir.Model) -> bytes | str:
        """Bytes for a model that fits in memory, else a temporary file with external data."""
        folders = external_folders(model)
        if weight_bytes(model) <= _IN_MEMORY_LIMIT and len(folders) <= 1:
            self._folder = folders.pop() if folders else None  # weights still in the input's file
            return ir.to_proto(model).SerializeToString()
        self._tmp = Path(tempfile.mkdtemp(prefix="onnxcompress-session-"))
        path = self._tmp / "model.onnx"
        save(model, path, external_data=True)
        return str(path)

    def _with_outputs(self, proto: onnx.ModelProto, extra: list[str]) -> onnx.ModelProto:
        present = {o.name for o in proto.graph.output}
        self._added = [n for n in extra if n not in present]
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in self._added)
        return proto

    def with_outputs(self, names: Sequence[str], label: str | None = None) -> Runner:
        """Another session on this runner's model exposing ``names``; close it after use
        (before this one, which owns any temporary file)."""
        return Runner(self._origin, label or self.label, names, self._folder, self.threads)

    def value_names(self) -> set[str]:
        """Every value this runner's model computes or takes in (weights not loaded)."""
        if isinstance(self._origin, bytes):
            proto = onnx.load_from_string(self._origin)
        else:
            proto = onnx.load(self._origin, load_external_data=False)
        names = {value.name for value in proto.graph.input}
        names.update(name for node in proto.graph.node for name in node.output)
        return names

    def run(self, feed: Feed) -> list[np.ndarray]:
        """The model's own outputs on ``feed``."""
        return self._run(self.output_names, feed)

    def capture(self, feed: Feed, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The ``extra_outputs`` values (or only ``names`` of them) on ``feed``, by name."""
        wanted = list(names) if names is not None else self.extra_outputs
        return dict(zip(wanted, self._run(wanted, feed)))

    def _run(self, names: list[str], feed: Feed) -> list[np.ndarray]:
        try:
            return self.session.run(names, feed)
        except Exception as exc:
            raise CannotRun(f"onnxruntime failed to run: {_first_line(exc)}") from None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def observe_shapes(model: ir.Model, feed: Feed, names: Iterable[str]) -> dict[str, tuple]:
    """Shapes of the named activations as onnxruntime computes them on ``feed``.

    The fallback where onnx's shape inference gives up (dynamic Reshape chains in exports).
    """
    try:
        runner = Runner(model, "model", extra_outputs=[n for n in names if n])
        try:
            return {name: tuple(np.shape(a)) for name, a in runner.capture(feed).items()}
        finally:
            runner.close()
    except CannotRun as exc:  # accounting only: never fatal
        logger.debug("observing shapes failed: %s", exc)
        return {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.replace("[ONNXRuntimeError] : ", "")[:300]


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
