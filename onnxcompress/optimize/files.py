"""What optimize writes: the chosen model (as compress writes it), its recipe, the trade-off
plot and the report, each checked before any work and written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnxcompress import guards, model_io
from onnxcompress.optimize.goals import Metric, Target, Tolerance
from onnxcompress.optimize.search import OptimizeResult, optimize
from onnxcompress.pipeline import Options, write_json
from onnxcompress.recipe import Recipe


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
    tolerance: Tolerance | None = None,
    options: Options | None = None,
    explore: bool = True,
    report_path: str | Path | None = None,
    metric: Metric | None = None,
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
    model, result = optimize(source, target, calibration, tolerance, options, explore, metric)
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
