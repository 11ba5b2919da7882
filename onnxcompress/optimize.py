"""optimize: reach a file-size target under the user's tolerance, choosing the recipe and,
within it, each layer's setting.

Within one recipe the per-layer choice is the codebook pass's (``passes/codebook/plan.py``):
every weight's bits and granularity, or float, weighed by its measured gain to the outputs
and allocated by a Lagrangian price until the bytes fit. Across recipes, what no estimate
settles (a refit on the data, or not) is tried end to end: each candidate is compressed and
validated on the held-out feeds, and the best one that meets the target and the tolerance is
kept. Around the target, the plain recipe is also run at smaller and larger sizes, so the
report shows the trade-off (size against fidelity, the chosen point marked) and how well the
probes' predicted error tracked the measured one.

Latency targets and user metrics are not built yet: they are refused with one line.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxcompress import guards, model_io
from onnxcompress.calibration import Feed
from onnxcompress.errors import BadOption, OnnxCompressError, ToleranceExceeded, first_line
from onnxcompress.pipeline import Gates, Options, run_recipe, write_json
from onnxcompress.progress import Steps
from onnxcompress.recipe import Recipe
from onnxcompress.report import CompressionReport, table
from onnxcompress.validate import Validation, gate_failures

#: Sizes explored around the target for the trade-off, as factors of its ratio.
EXPLORED = (0.5, 0.75, 1.25, 1.5)
#: A result within this share of the target size meets it (the codebook pass's own margin).
SIZE_SLACK = 0.05
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


def parse_tolerance(texts: Sequence[str]) -> Gates | None:
    """``agreement=0.99`` (top-1 agreement with the original) and ``rel=0.02`` (relative L2
    error of each output) as gates."""
    found: dict[str, float] = {}
    for text in texts:
        key, _, value = text.partition("=")
        key = key.strip().lower()
        if key not in ("agreement", "rel"):
            hint = "; drop= needs --metric, not built yet" if key == "drop" else ""
            raise BadOption(f"--tolerance {text}: give agreement=A or rel=R{hint}")
        try:
            found[key] = float(value)
        except ValueError:
            raise BadOption(f"--tolerance {text}: {value!r} is not a number") from None
    if not found:
        return None
    return Gates(max_rel_error=found.get("rel"), min_agreement=found.get("agreement"))


@dataclass
class Trial:
    """One recipe compressed and measured end to end."""

    recipe: list[str]
    role: str  # "candidate" (may be chosen) or "explored" (the trade-off around the target)
    file_bytes: int
    ratio: float
    validation: Validation | None
    predicted: float | None  # the probes' predicted output error (relative, squared)
    failures: list[str]
    seconds: float
    meets_size: bool = False
    error: str | None = None  # why the recipe could not run

    @property
    def measured(self) -> float | None:
        """The measured output error, as the prediction counts it: relative L2 squared,
        summed over the outputs."""
        if self.validation is None:
            return None
        return sum(o.rel_l2**2 for o in self.validation.outputs)

    @property
    def acceptable(self) -> bool:
        return self.error is None and self.meets_size and not self.failures

    def row(self, chosen: bool) -> list[str]:
        v = self.validation
        agreement = None if v is None else v.min_agreement
        return [
            ("* " if chosen else "  ") + " ".join(self.recipe),
            f"{self.ratio:.2f}x",
            "-" if v is None else f"{v.worst_rel_l2:.4f}",
            "-" if agreement is None else f"{agreement:.4f}",
            "-" if self.predicted is None else f"{self.predicted:.3g}",
            "-" if self.measured is None else f"{self.measured:.3g}",
            f"{self.seconds:.0f}",
            self.error or _verdict(self),
        ]


def _verdict(trial: Trial) -> str:
    if trial.role == "candidate" and trial.acceptable:
        return "meets both"
    if trial.role == "explored":
        return "explored" + ("" if trial.failures else ", within tolerance")
    return "size missed" if not trial.meets_size else "tolerance missed"


@dataclass
class OptimizeResult:
    target: Target
    tolerance: Gates | None
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    report: CompressionReport | None = None  # the chosen recipe's own report

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.words(),
            "tolerance": self.tolerance.as_dict() if self.tolerance else {},
            "chosen": self.chosen.recipe if self.chosen else None,
            "trials": [_trial_dict(t, t is self.chosen) for t in self.trials],
            "report": self.report.to_dict() if self.report else None,
        }

    def to_text(self) -> str:
        header = ["recipe", "smaller", "worst rel L2", "agreement", "predicted", "measured"]
        header += ["s", ""]
        rows = [t.row(t is self.chosen) for t in sorted(self.trials, key=lambda t: t.ratio)]
        lines = [f"optimize: {self.target.words()}", *table(header, rows)]
        lines.append(
            "predicted / measured: relative squared output error summed over outputs (the "
            "prediction is taken before a final Softmax or Sigmoid, the measure after)"
        )
        return "\n".join(lines)


def _trial_dict(trial: Trial, chosen: bool) -> dict[str, Any]:
    data = dataclasses.asdict(trial)
    data.pop("validation")
    v = trial.validation
    data.update(
        chosen=chosen,
        worst_rel_l2=None if v is None else v.worst_rel_l2,
        min_agreement=None if v is None else v.min_agreement,
        measured=trial.measured,
    )
    return data


#: Shares of each layer's weights zeroed before the codebook in the sparse candidates (the
#: codebook then stores the rest sparse where that is smaller: Deep Compression's recipe).
SPARSITIES = (0.5,)


def candidates(target: Target, user_data: bool) -> list[list[str]]:
    """The recipes that may be chosen, cheapest first: the codebook alone (every layer's bits
    and granularity allocated to the target), refitted to the data, and after magnitude
    sparsity (refitted on the data when there is some)."""
    size = target.size_option()
    recipes = [[f"codebook:size={size}"]]
    if user_data:
        recipes.append([f"codebook:size={size},data_aware=true"])
    recipes += [[f"sparsity:ratio={share:g}", f"codebook:size={size}"] for share in SPARSITIES]
    return recipes


def optimize(
    source: str | Path,
    target: Target,
    calibration: str | Path | Sequence[Feed] | None,
    tolerance: Gates | None = None,
    options: Options | None = None,
    explore: bool = True,
) -> tuple[ir.Model | None, OptimizeResult]:
    """The best candidate that meets ``target`` and ``tolerance`` on the validation feeds
    (``options.validation_data``, else the calibration), with every trial measured; the
    model is None when no candidate meets both. ``source`` is a model file."""
    options = options or Options()
    if not options.validate:
        raise BadOption("optimize measures every candidate: it cannot run without validation")
    result = OptimizeResult(target, tolerance)
    original = model_io.size_on_disk(source)
    plan = [(r, "candidate", 1.0) for r in candidates(target, calibration is not None)]
    if explore and target.ratio is not None:
        plan += [([f"codebook:size={target.size_option(f)}"], "explored", f) for f in EXPLORED]
    steps = Steps(options.progress, "optimize: recipes tried", len(plan))
    best = None
    with tempfile.TemporaryDirectory(prefix="onnxcompress-optimize-") as scratch:
        for recipe, role, factor in plan:
            run = _Run(source, calibration, tolerance, options, Path(scratch) / "trial.onnx")
            trial, model, report = run.trial(recipe, role, target.goal_bytes(original, factor))
            trial.ratio = original / trial.file_bytes if trial.file_bytes else 0.0
            result.trials.append(trial)
            if role == "candidate" and trial.acceptable and _better(trial, result.chosen):
                result.chosen, result.report, best = trial, report, model
            steps.done()
    return best, result


def _better(trial: Trial, chosen: Trial | None) -> bool:
    """Lower worst relative L2 error wins; a tie keeps the cheaper (earlier) recipe."""
    return chosen is None or trial.validation.worst_rel_l2 < chosen.validation.worst_rel_l2


@dataclass
class _Run:
    """What every trial shares: the source, the data, the gates, the options, and a scratch
    file to measure the saved size on."""

    source: str | Path
    calibration: str | Path | Sequence[Feed] | None
    tolerance: Gates | None
    options: Options
    scratch: Path

    def trial(self, recipe: list[str], role: str, goal: float):
        """(the trial, its model, its report); no model when the recipe could not run."""
        start = time.perf_counter()
        loaded = model_io.load(self.source)
        external_data = model_io.wants_external_data(loaded.model)  # as compress decides
        try:
            model, report = run_recipe(loaded, recipe, self.calibration, None, self.options)
        except ToleranceExceeded as missed:  # a pass's own target missed
            model, report = missed.model, missed.report
        except OnnxCompressError as exc:
            seconds = time.perf_counter() - start
            failed = Trial(recipe, role, 0, 0.0, None, None, [], seconds, error=first_line(exc))
            return failed, None, None
        # saved as compress would save it: the recipe replays to these bytes
        model_io.save(model, self.scratch, external_data=external_data)
        size = model_io.size_on_disk(self.scratch)
        trial = Trial(
            recipe,
            role,
            size,
            0.0,
            report.validation,
            _predicted(report) if len(recipe) == 1 else None,
            self._misses(report.validation),
            time.perf_counter() - start,
            meets_size=size <= goal * (1 + SIZE_SLACK),
        )
        return trial, model, report

    def _misses(self, validation: Validation | None) -> list[str]:
        if self.tolerance is None:
            return []
        if validation is None:
            return ["not validated"]
        gates = self.tolerance
        return gate_failures(
            validation, gates.max_rel_error, gates.min_agreement, gates.outputs or None
        )


def _predicted(report: CompressionReport) -> float | None:
    """The codebook pass's predicted output error: its layers' shares summed (for a recipe
    of the codebook alone: it does not count what a pass before it changed)."""
    shares = [
        layer.detail["predicted_output_error"]
        for compression_pass in report.passes
        for layer in compression_pass.layers
        if "predicted_output_error" in layer.detail
    ]
    return float(sum(shares)) if shares else None


@dataclass(frozen=True)
class Written:
    """The files an optimize run writes beside its output model."""

    model: Path
    recipe: Path
    plot: Path
    report: Path | None

    @classmethod
    def beside(cls, output: str | Path, report: str | Path | None) -> Written:
        output = Path(output)
        stem = output.with_suffix("")
        return cls(
            output,
            stem.with_name(stem.name + ".recipe.json"),
            stem.with_name(stem.name + ".tradeoff.png"),
            Path(report) if report else None,
        )


def optimize_file(
    source: str | Path,
    output: str | Path,
    target: Target,
    calibration: str | Path | None,
    tolerance: Gates | None = None,
    options: Options | None = None,
    explore: bool = True,
    report_path: str | Path | None = None,
) -> tuple[OptimizeResult, Written, list[str]]:
    """``optimize`` on a file; when a candidate is chosen, write the model (as ``compress``
    writes it: ``compress --recipe`` with the written recipe replays it to the same bytes),
    the recipe, the trade-off plot (with matplotlib) and the JSON report. Nothing is written
    when no candidate meets the target and the tolerance, except the report. Returns the
    result, the paths and notes on what was not written."""
    written = Written.beside(output, report_path)
    loaded = model_io.load(source)
    external_data = model_io.wants_external_data(loaded.model)
    _check_paths(loaded, written, external_data)
    del loaded
    model, result = optimize(source, target, calibration, tolerance, options, explore)
    notes = []
    if model is not None:
        model_io.save(model, written.model, external_data=external_data)
        recipe = Recipe.from_options(result.chosen.recipe).to_dict()
        write_json(written.recipe, recipe)
        notes += plot_tradeoff(result, written.plot)
    if written.report:
        write_json(written.report, result.to_dict())
    return result, written, notes


def _check_paths(loaded: model_io.Loaded, written: Written, external_data: bool) -> None:
    """Before any work: each file can be written and none is an input or another output."""
    target = model_io.write_target(written.model)
    outputs = [("output", target), ("recipe", written.recipe), ("plot", written.plot)]
    if external_data:
        outputs.append(("output's external data", model_io.data_file(target)))
    if written.report:
        outputs.append(("report", written.report))
    guards.refuse_overwrites(outputs, model_io.input_files(loaded))
    for what, path in outputs:
        guards.check_writable(path, what)


def plot_tradeoff(result: OptimizeResult, path: Path) -> list[str]:
    """Size against fidelity for every trial, the chosen one marked, written atomically;
    a note instead when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return [f"no plot written: pip install 'onnxcompress[plot]' for {path.name}"]
    measured = [t for t in result.trials if t.validation is not None]
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for role, marker in (("explored", "o"), ("candidate", "s")):
        points = [t for t in measured if t.role == role]
        axes.scatter(
            [t.ratio for t in points],
            [max(t.validation.worst_rel_l2, 1e-6) for t in points],
            marker=marker,
            label=role,
        )
    if result.chosen is not None:
        chosen = result.chosen
        axes.scatter(
            [chosen.ratio],
            [max(chosen.validation.worst_rel_l2, 1e-6)],
            s=200,
            marker="*",
            color="red",
            label="chosen",
            zorder=3,
        )
    if result.target.ratio is not None:
        axes.axvline(result.target.ratio, color="grey", linestyle="--", label="target")
    axes.set(xlabel="times smaller (file)", ylabel="worst relative L2 error", yscale="log")
    axes.legend()
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    try:
        figure.savefig(partial, dpi=100)
        partial.replace(path)
    finally:
        pyplot.close(figure)
        partial.unlink(missing_ok=True)
    return []
